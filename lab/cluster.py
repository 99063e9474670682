"""A cluster on one machine: origin, cache/tracker/seeder and N nodes, each in its namespace.

Why: the claim of this project (the origin stops being the bottleneck when many nodes pull at
once) can only be shown with several nodes whose links, not the CPU, limit the transfer. The
same harness serves the CI test, the demo and the benchmark, in three modes:

- ``direct``: each node's containerd pulls from the origin;
- ``cache``: a pull-through cache (docker-registry in proxy mode) in front of the origin;
- ``p2p``: each node runs ``p2p-mirror agent``; trackers and seeders (one of each unless
  told) run on their own nodes. ``nat_to_trackers`` routes the nodes' traffic to the
  trackers through a ``nat`` node that source-NATs it (iptables MASQUERADE), as kube-proxy
  may; the agents then announce their own address (``--announce-ip``).

All processes start through a ``ProcGroup`` (or the lab wrappers) and stop by PID on exit;
the ``Network`` then deletes namespaces, veths and bridge.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from lab.containerd import Containerd
from lab.images import ImageLayout, push_image
from lab.netns import DEFAULT_MTU, Network, NodeSpec
from lab.procs import LabError, Proc, ProcGroup, port_open
from lab.registry import Registry
from p2p_mirror.core.clusterauth import generate_secret
from p2p_mirror.core.metrics import parse_samples
from p2p_mirror.installer import hosts

MODES = ("direct", "cache", "p2p")
REGISTRY_NAME = "registry.example.test"
ORIGIN_PORT = 5000
AGENT_LISTEN = "127.0.0.1:5004"
AGENT_URL = f"http://{AGENT_LISTEN}"
TRACKER_PORT = 6969
SEEDER_PORT = 5005
SEEDER_BT_PORT = 6882
AGENT_BT_PORT = 6881


def p2p_mirror_argv() -> list[str]:
    """The ``p2p-mirror`` command of the product this interpreter has installed."""
    return [sys.executable, "-m", "p2p_mirror"]


def hosts_toml(server: str, mirror: str | None) -> str:
    """containerd hosts.toml: the agent first (``mirror``), ``server`` as the fallback."""
    if mirror is None:
        # containerd 1.6 rejects a hosts.toml without any [host] table ("invalid host tree")
        return hosts.render(server, [hosts.Host(server)])
    return hosts.render_new(mirror, server)


def install_hosts(containerd: Containerd, server: str, mirror: str | None) -> Path:
    """Let ``p2p-mirror install`` write the node's hosts.toml, under a per-node host root.

    The node's containerd is not running yet, so the installer is told not to restart it;
    the pulls then use the ``certs.d`` the installer wrote.
    """
    root = containerd.workdir / "host"
    config = root / "etc" / "containerd" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("version = 2\n")
    argv = [*p2p_mirror_argv(), "install", "--root", str(root), "--runtime", "containerd",
            "--registry", f"{REGISTRY_NAME}={server}", "--no-restart"]
    if mirror is not None:
        argv += ["--mirror", mirror]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False,
                         )  # fmt: skip
    if out.returncode != 0:
        raise LabError(f"p2p-mirror install failed ({out.returncode}): {out.stderr[-2000:]}")
    return root / "etc" / "containerd" / "certs.d"


def parse_blob_sources(metrics_text: str) -> dict[str, int]:
    """``{"swarm": n, "origin": n, "cache": n}`` from the agent's Prometheus text."""
    out: dict[str, int] = {}
    for s in parse_samples(metrics_text):
        if s.name == "p2p_mirror_blob_bytes_total" and "source" in s.labels:
            out[s.labels["source"]] = out.get(s.labels["source"], 0) + int(s.value)
    return out


@dataclass
class NodeResult:
    """One node's pull: wall time from the common start, bytes its link received, sources."""

    node: str
    ok: bool
    seconds: float
    rx_bytes: int
    tx_bytes: int = 0
    digest: str = ""
    error: str = ""
    sources: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Progress:
    """A live sample: bytes received on the node's link so far, against the image size."""

    node: str
    rx_bytes: int
    expected: int
    done: bool
    seconds: float


def progress_cells(samples: Sequence[Progress]) -> str:
    """Each node's share of the image so far (``done`` once pulled), for a live line."""
    cells = []
    for p in samples:
        pct = 100 * p.rx_bytes / p.expected if p.expected else 0
        cells.append("done" if p.done else f"{min(pct, 99.9):4.0f}%")
    return " ".join(cells)


@dataclass
class _NodeParts:
    name: str
    containerd: Containerd
    hosts_dir: Path
    agent: Proc | None = None


class Cluster:
    """Namespaces + real registry/containerd/agents. Use as a context manager.

    ``rate_mbit`` shapes every node's link both ways (frames of ``mtu`` bytes);
    ``infra_rate_mbit`` (default: the same) shapes origin, cache and seeder, so "origin
    link = node link" unless told otherwise.
    ``origin_storage`` seeds the origin's registry storage (hard links) so a benchmark does
    not re-push the image through the shaped link for every run. ``write_hosts(containerd,
    server, mirror)`` replaces the built-in hosts.toml writer (e.g. ``install_hosts``, the
    real installer); it is called before that node's containerd starts, ``mirror`` is None
    outside p2p mode, and it may return the hosts directory the node's pulls should use.
    """

    def __init__(
        self,
        workdir: Path,
        nodes: int,
        mode: str = "p2p",
        rate_mbit: float | None = 100.0,
        infra_rate_mbit: float | None = None,
        mtu: int = DEFAULT_MTU,
        origin_storage: Path | None = None,
        agent_args: Sequence[str] = (),
        seeder_args: Sequence[str] = (),
        log: Callable[[str], None] | None = None,
        write_hosts: Callable[[Containerd, str, str | None], Path | None] | None = None,
        seeders: int = 1,
        trackers: int = 1,
        nat_to_trackers: bool = False,
        tracker_scheme: str = "udp",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not 1 <= nodes <= 90:
            raise ValueError("nodes must be 1..90")
        if not (1 <= seeders <= 8 and 1 <= trackers <= 8):
            raise ValueError("seeders and trackers must be 1..8")
        if tracker_scheme not in ("udp", "http"):
            raise ValueError(f"tracker_scheme must be udp or http, got {tracker_scheme!r}")
        self.tracker_scheme = tracker_scheme
        self.workdir = Path(workdir).resolve()
        self.n = nodes
        self.mode = mode
        self.rate_mbit = rate_mbit
        self.infra_rate_mbit = rate_mbit if infra_rate_mbit is None else infra_rate_mbit
        self.origin_storage = origin_storage
        self.agent_args = list(agent_args)
        self.seeder_args = list(seeder_args)
        self.log = log or (lambda _msg: None)
        self.write_hosts = write_hosts
        self.node_names = [f"node{i}" for i in range(1, nodes + 1)]
        infra = ["origin"]
        if mode == "cache":
            infra.append("cache")
        self.tracker_names = _role_names("tracker", trackers) if mode == "p2p" else []
        self.seeder_names = _role_names("seeder", seeders) if mode == "p2p" else []
        self.nat_to_trackers = nat_to_trackers and mode == "p2p"
        infra += self.tracker_names + self.seeder_names
        if self.nat_to_trackers:
            infra.append("nat")
        specs = [NodeSpec(n, self.infra_rate_mbit, self.infra_rate_mbit) for n in infra]
        specs += [NodeSpec(n, rate_mbit, rate_mbit) for n in self.node_names]
        self.net = Network(specs, mtu=mtu)
        self.procs = ProcGroup()
        self.origin: Registry | None = None
        self.cache: Registry | None = None
        self.parts: dict[str, _NodeParts] = {}
        self.roles: dict[str, Proc] = {}  # tracker and seeder processes by node name
        self._started = False

    # -- addresses -----------------------------------------------------------------------

    def ip(self, name: str) -> str:
        return self.net.node(name).ip

    @property
    def origin_url(self) -> str:
        return f"http://{self.ip('origin')}:{ORIGIN_PORT}"

    @property
    def origin_hostport(self) -> str:
        return f"{self.ip('origin')}:{ORIGIN_PORT}"

    def ref(self, repo: str, tag: str) -> str:
        """The name nodes pull: the registry name, resolved only through hosts.toml."""
        return f"{REGISTRY_NAME}/{repo}:{tag}"

    # -- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Network first (verified before any traffic), then servers, then the nodes."""
        self._started = True
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.net.__enter__()
        self.net.verify()
        self.log(f"network {self.net.prefix}: {self.net.subnet}, {len(self.net.nodes)} nodes")
        self._start_origin()
        if self.mode == "cache":
            self._start_cache()
        if self.mode == "p2p":
            self._start_tracker_and_seeder()
        if self.nat_to_trackers:
            self._nat_node_traffic_to_trackers()
        self._start_nodes()

    def close(self) -> None:
        """Stop every process by PID, then delete the namespaces; never raises."""
        if not self._started:
            return
        self._started = False
        with ThreadPoolExecutor(max_workers=8) as pool:
            for parts in self.parts.values():
                pool.submit(parts.containerd.stop)
        with contextlib.suppress(Exception):
            self.procs.close()
        for reg in (self.cache, self.origin):
            if reg is not None:
                with contextlib.suppress(Exception):
                    reg.stop()
        self.net.teardown()

    def _start_origin(self) -> None:
        wd = self.workdir / "origin"
        if self.origin_storage is not None:
            shutil.rmtree(wd / "storage", ignore_errors=True)
            shutil.copytree(self.origin_storage, wd / "storage", copy_function=os.link)
        self.origin = Registry(
            wd, netns=self.net.node("origin").netns, host=self.ip("origin"), port=ORIGIN_PORT
        )
        self.origin.start()
        self.log(f"origin registry at {self.origin_url}")

    def _start_cache(self) -> None:
        self.cache = Registry(
            self.workdir / "cache",
            netns=self.net.node("cache").netns,
            host=self.ip("cache"),
            port=ORIGIN_PORT,
            proxy_remote_url=self.origin_url,
        )
        self.cache.start()
        self.log(f"pull-through cache at {self.cache.url}")

    @property
    def cluster_secret(self) -> Path:
        """The secret every role of this cluster shares (made on first use), as in production."""
        path = self.workdir / "cluster-secret"
        if not path.exists():
            self.workdir.mkdir(parents=True, exist_ok=True)
            generate_secret(path)
        return path

    def _start_tracker_and_seeder(self) -> None:
        secret = ["--cluster-secret", str(self.cluster_secret)]
        for name in self.tracker_names:
            self.roles[name] = self.procs.start(
                [*p2p_mirror_argv(), "tracker", "--listen", f"{self.ip(name)}:{TRACKER_PORT}",
                 *secret],
                self.workdir / name / "tracker.log",
                netns=self.net.node(name).netns,
            )
        trackers = [arg for url in self.tracker_announces for arg in ("--tracker", url)]
        for name in self.seeder_names:
            sip = self.ip(name)
            self.roles[name] = self.procs.start(
                [
                    *p2p_mirror_argv(), "seeder",
                    "--listen", f"{sip}:{SEEDER_PORT}",
                    "--data-dir", str(self.workdir / name / "data"),
                    *trackers,
                    "--bt-listen", f"{sip}:{SEEDER_BT_PORT}",
                    "--announce-ip", sip,
                    "--registry", f"{REGISTRY_NAME}={self.origin_url}",
                    *secret,
                    *self.seeder_args,
                ],
                self.workdir / name / "seeder.log",
                netns=self.net.node(name).netns,
            )  # fmt: skip
        for name, proc in self.roles.items():
            port = TRACKER_PORT if name in self.tracker_names else SEEDER_PORT
            proc.wait_ready(lambda ip=self.ip(name), port=port: port_open(ip, port), 30, name)
        self.log(f"trackers {', '.join(self.tracker_announces)}; "
                 f"seeders {', '.join(self.seeder_urls)}")  # fmt: skip

    def _nat_node_traffic_to_trackers(self) -> None:
        """Route every node's packets to the trackers through the ``nat`` node, which
        rewrites their source to its own address (MASQUERADE); replies go back the same way."""
        nat = self.net.node("nat")
        for key in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.send_redirects=0",
                    f"net.ipv4.conf.{nat.veth_ns}.send_redirects=0"):  # fmt: skip
            self.net.run("nat", ["sysctl", "-qw", key])
        self.net.run("nat", ["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", nat.veth_ns,
                             "-j", "MASQUERADE"])  # fmt: skip
        for name in self.node_names:
            self.net.run(name, ["sysctl", "-qw", "net.ipv4.conf.all.accept_redirects=0"])
            for tracker in self.tracker_names:
                self.net.run(name, ["ip", "route", "add", f"{self.ip(tracker)}/32",
                                    "via", nat.ip])  # fmt: skip
        self.log(f"nodes reach the trackers through nat {nat.ip} (MASQUERADE)")

    @property
    def tracker_announce(self) -> str:
        return self.tracker_announces[0]

    @property
    def tracker_announces(self) -> list[str]:
        return [f"{self.tracker_scheme}://{self.ip(n)}:{TRACKER_PORT}/announce"
                for n in self.tracker_names]  # fmt: skip

    @property
    def seeder_urls(self) -> list[str]:
        return [f"http://{self.ip(n)}:{SEEDER_PORT}" for n in self.seeder_names]

    def stop_role(self, name: str) -> None:
        """Kill a tracker or seeder (SIGKILL: a crash, nothing said goodbye)."""
        proc = self.roles[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.popen.wait(timeout=10)

    def role_metrics(self, name: str) -> str:
        """A seeder's or tracker's ``/metrics`` text (they listen on the bridge)."""
        port = TRACKER_PORT if name in self.tracker_names else SEEDER_PORT
        with urllib.request.urlopen(f"http://{self.ip(name)}:{port}/metrics", timeout=10) as r:
            return r.read().decode()

    def _server_for_nodes(self) -> str:
        if self.mode == "cache":
            assert self.cache is not None
            return self.cache.url
        return self.origin_url

    def _start_nodes(self) -> None:
        server = self._server_for_nodes()
        mirror = AGENT_URL if self.mode == "p2p" else None
        for name in self.node_names:
            ctd = Containerd(self.workdir / name / "ctd", netns=self.net.node(name).netns)
            hosts_dir = ctd.certs_dir
            if self.write_hosts is not None:
                hosts_dir = self.write_hosts(ctd, server, mirror) or hosts_dir
            else:
                (hosts_dir / REGISTRY_NAME).mkdir(parents=True, exist_ok=True)
                (hosts_dir / REGISTRY_NAME / "hosts.toml").write_text(hosts_toml(server, mirror))
            self.parts[name] = _NodeParts(name, ctd, hosts_dir)
            if self.mode == "p2p":
                self.parts[name].agent = self._start_agent(name)
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(lambda p: p.containerd.start(timeout=60), self.parts.values()))
        for parts in self.parts.values():
            if parts.agent is not None:
                netns = self.net.node(parts.name).netns
                parts.agent.wait_ready(lambda ns=netns: _listening(ns, 5004), 60,
                                       f"agent on {parts.name}")  # fmt: skip
        extra = " + agent" if mirror else ""
        self.log(f"{self.n} nodes up ({self.mode}): containerd{extra}")

    def _start_agent(self, name: str) -> Proc:
        node = self.net.node(name)
        return self.procs.start(
            [
                *p2p_mirror_argv(), "agent",
                "--listen", AGENT_LISTEN,
                "--data-dir", str(self.workdir / name / "agent"),
                *[arg for url in self.seeder_urls for arg in ("--seeder", url)],
                "--bt-listen", f"{node.ip}:{AGENT_BT_PORT}",
                "--registry", f"{REGISTRY_NAME}={self.origin_url}",
                *(["--announce-ip", node.ip] if self.nat_to_trackers else []),
                "--cluster-secret", str(self.cluster_secret),
                *self.agent_args,
            ],
            self.workdir / name / "agent.log",
            netns=node.netns,
        )  # fmt: skip

    # -- use -------------------------------------------------------------------------------

    def push(self, layout: ImageLayout, repo: str, tag: str) -> str:
        """Push through the origin's (shaped) link from the root namespace; returns the ref."""
        push_image(layout, self.origin_hostport, repo, tag)
        return self.ref(repo, tag)

    def origin_mark(self) -> int:
        assert self.origin is not None
        return self.origin.mark()

    def origin_egress(self, since: int = 0) -> int:
        """Bytes the origin's registry sent since ``origin_mark()`` (after its log settles)."""
        assert self.origin is not None
        self.origin.settle()
        return self.origin.egress_bytes(since)

    def rx_bytes(self, name: str) -> int:
        """Bytes the bridge delivered to a node so far (its download link's counter)."""
        veth = self.net.node(name).veth_host
        return int(Path(f"/sys/class/net/{veth}/statistics/tx_bytes").read_text())

    def tx_bytes(self, name: str) -> int:
        """Bytes a node (any role) sent into the bridge so far (its upload link's counter)."""
        veth = self.net.node(name).veth_host
        return int(Path(f"/sys/class/net/{veth}/statistics/rx_bytes").read_text())

    def agent_metrics(self, name: str) -> str:
        """The agent's ``/metrics`` text, fetched from inside the node (it listens on lo)."""
        out = self.net.run(name, ["curl", "-sf", "--max-time", "5", f"{AGENT_URL}/metrics"],
                           timeout=10, check=False)  # fmt: skip
        return out.stdout if out.returncode == 0 else ""

    def agent_pids(self) -> dict[str, int]:
        """Each node's agent process (p2p mode; nsenter execs it, so the PID is the agent)."""
        return {name: parts.agent.pid for name, parts in self.parts.items()
                if parts.agent is not None}  # fmt: skip

    def blob_sources(self, name: str) -> dict[str, int]:
        return parse_blob_sources(self.agent_metrics(name)) if self.mode == "p2p" else {}

    def pull_all(
        self,
        ref: str,
        expected_digest: str | None = None,
        expected_bytes: int = 0,
        progress: Callable[[list[Progress]], None] | None = None,
        interval: float = 0.5,
        timeout: float = 900.0,
    ) -> list[NodeResult]:
        """Every node runs ``ctr image pull`` at the same instant (without progress bars, as a
        kubelet pulls); each is timed from there.

        ``progress`` gets one sample per node every ``interval`` seconds (bytes received on
        the node's link, which works the same in every mode).
        """
        base = {n: self.rx_bytes(n) for n in self.node_names}
        base_tx = {n: self.tx_bytes(n) for n in self.node_names}
        before = {n: self.blob_sources(n) for n in self.node_names}
        results: dict[str, NodeResult] = {}
        barrier = threading.Barrier(self.n + 1)
        t0 = 0.0

        def one(name: str) -> None:
            parts = self.parts[name]
            barrier.wait()
            try:
                proc = parts.containerd.pull(ref, parts.hosts_dir, timeout=timeout,
                                             check=False, progress=False)
                ok, err = proc.returncode == 0, proc.stderr.strip()[-2000:]
            except (subprocess.TimeoutExpired, LabError) as e:
                ok, err = False, str(e)
            seconds = time.monotonic() - t0
            results[name] = NodeResult(name, ok, seconds, self.rx_bytes(name) - base[name],
                                       error="" if ok else err)  # fmt: skip

        threads = [threading.Thread(target=one, args=(n,), daemon=True) for n in self.node_names]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        barrier.wait()
        while any(t.is_alive() for t in threads):
            if progress is not None:
                now = time.monotonic() - t0
                progress([
                    Progress(n, self.rx_bytes(n) - base[n], expected_bytes, n in results,
                             results[n].seconds if n in results else now)
                    for n in self.node_names
                ])  # fmt: skip
            for t in threads:
                t.join(interval / len(threads))
        for name, res in results.items():
            if res.ok:
                try:
                    res.digest = self.parts[name].containerd.image_digest(ref)
                except LabError as e:
                    res.ok, res.error = False, str(e)
                if expected_digest and res.digest != expected_digest:
                    res.ok = False
                    res.error = f"digest {res.digest} != {expected_digest}"
            res.tx_bytes = self.tx_bytes(name) - base_tx[name]
            after = self.blob_sources(name)
            res.sources = {k: v - before[name].get(k, 0) for k, v in after.items()}
        return [results[n] for n in self.node_names]

    def remove_image(self, ref: str) -> None:
        """Forget the image on every node's containerd (the agents keep their caches)."""
        for parts in self.parts.values():
            parts.containerd.remove_image(ref)

    def logs(self) -> Iterator[tuple[str, str]]:
        """(name, tail) of every process log, for failure reports."""
        for proc in self.procs.procs:
            yield str(proc.log), proc.tail(20)


def _role_names(role: str, count: int) -> list[str]:
    """``tracker`` for one, ``tracker1``..``trackerN`` for several."""
    return [role] if count == 1 else [f"{role}{i}" for i in range(1, count + 1)]


def _listening(netns: str, port: int) -> bool:
    """Is something listening on TCP ``port`` inside ``netns``? (``ss -N`` reads it there.)"""
    out = subprocess.run(
        ["ss", "-H", "-N", netns, "-ltn", f"sport = :{port}"],
        capture_output=True, text=True, timeout=10, check=False,
    )  # fmt: skip
    return out.returncode == 0 and f":{port}" in out.stdout
