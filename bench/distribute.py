"""Benchmark: direct vs pull-through cache vs p2p-mirror, N nodes pulling one image at once.

Every run is a fresh ``Cluster`` (namespaces, shaped links, real docker-registry, containerd
and p2p-mirror processes); nodes, origin, cache and seeder all get the same link rate, so the
figures compare distribution strategies, not hardware. The default rate, 20 Mbit/s, keeps
the links the bottleneck up to N=8 on a 2-core machine (CPU 53-76% busy at N=8); at 50 Mbit/s
the CPU is (85-100% busy at N=8), and the figures measure the machine instead. Results go
to ``bench/results/``: ``distribute.md`` (tables + the exact command), ``distribute.png``
and ``distribute.json``.

Run as root from the repository root::

    python -m bench.distribute                       # the defaults, ~50 min on 2 cores
    python -m bench.distribute --nodes 1,2 --sizes 8MiB --modes direct,cache   # quick look
"""

from __future__ import annotations

import ast
import json
import math
import os
import platform
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import click

from bench.cpu_profile import role_tables
from bench.stream import Recorders
from lab.cluster import (
    MODES,
    Cluster,
    NodeResult,
    Progress,
    progress_cells,
)
from lab.images import ImageLayout, build_image, push_image
from lab.netns import (
    DEFAULT_MTU,
    MTU_RANGE,
    cleanup_stale,
    exit_on_signals,
)
from lab.procs import CpuTime
from lab.registry import Registry
from p2p_mirror.core.config import parse_size

MiB = 1024 * 1024
GiB = 1024 * MiB
REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "bench" / "results"
REPO, TAG = "bench/image", "v1"
# A run with the machine's CPU at least this busy measured the cores that run every node of
# the lab, not the links: its status says so.
CPU_BOUND = 0.9


@dataclass
class RunResult:
    """One (mode, N, image size) run, with the figures the report needs."""

    mode: str
    nodes: int
    image_bytes: int
    rate_mbit: float
    ok: bool
    all_done_s: float
    p50_s: float
    p99_s: float
    origin_egress_bytes: int
    lower_bound_s: float
    setup_s: float
    error: str = ""
    swarm_bytes: int = 0
    agent_origin_bytes: int = 0
    node_upload_bytes: int = 0
    node_seconds: list[float] = field(default_factory=list)
    cpu_busy: float = 0.0
    agent_cpu_s: list[float] = field(default_factory=list)  # each node's agent, this pull
    all_done_runs: list[float] = field(default_factory=list)  # every try of a repeated run

    @property
    def egress_ratio(self) -> float:
        return self.origin_egress_bytes / self.image_bytes

    @property
    def agent_cpu_per_gib(self) -> list[float]:
        """Each node's agent CPU-seconds per GiB it delivered (the image, to its containerd)."""
        return [s * GiB / self.image_bytes for s in self.agent_cpu_s]

    @property
    def lb_ratio(self) -> float:
        return self.all_done_s / self.lower_bound_s if self.lower_bound_s else math.nan


def median_run(tries: list[RunResult]) -> RunResult:
    """The try with the median all-done time (the upper one for an even count), carrying
    every try's time; a failed try is reported instead, so a failure is never averaged away."""
    failed = [r for r in tries if not r.ok]
    pick = failed[0] if failed else sorted(tries, key=lambda r: r.all_done_s)[len(tries) // 2]
    return replace(pick, all_done_runs=[r.all_done_s for r in tries])


def merge_runs(earlier: list[RunResult], runs: list[RunResult]) -> list[RunResult]:
    """``earlier`` rows that ``runs`` did not measure again, then ``runs``: re-measuring one
    mode after a change keeps the other modes' rows of the full run."""
    again = {(r.mode, r.nodes, r.image_bytes) for r in runs}
    return [r for r in earlier if (r.mode, r.nodes, r.image_bytes) not in again] + runs


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in 0..100) of a small sample."""
    if not values:
        return math.nan
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def lower_bound(image_bytes: int, nodes: int, rate_mbit: float) -> float:
    """Physical floor: every node must download the image over its own link, and N copies must
    be uploaded by the origin plus the nodes: max(S / slowest link, N*S / total upload)."""
    rate = rate_mbit * 1e6 / 8
    return max(image_bytes / rate, nodes * image_bytes / ((nodes + 1) * rate))


def layer_sizes(total: int, layers: int) -> list[int]:
    """``layers`` near-equal layer payloads adding up to ``total`` bytes."""
    base = total // layers
    return [base + (1 if i < total % layers else 0) for i in range(layers)]


def prepare_image(workdir: Path, size: int, layers: int, seed: int) -> tuple[ImageLayout, Path]:
    """Build the image and push it once into a registry storage the origins are seeded from."""
    layout = build_image(workdir / "oci", layer_sizes(size, layers), seed)
    seed_reg = Registry(workdir / "seed")
    with seed_reg:
        push_image(layout, seed_reg.hostport, REPO, TAG)
    return layout, seed_reg.storage


def _progress_printer(label: str) -> object:
    last = [0.0]

    def show(samples: list[Progress]) -> None:
        now = time.monotonic()
        if now - last[0] < 1.0:
            return
        last[0] = now
        t = max(p.seconds for p in samples)
        line = f"  {label} t={t:6.1f}s " + progress_cells(samples)
        if sys.stderr.isatty():
            sys.stderr.write("\r" + line[:200] + "\x1b[K")
        else:
            sys.stderr.write(line[:200] + "\n")
        sys.stderr.flush()

    return show


def run_one(
    workdir: Path,
    mode: str,
    nodes: int,
    layout: ImageLayout,
    storage: Path,
    rate_mbit: float,
    timeout: float,
    mtu: int = DEFAULT_MTU,
    profile: Path | None = None,
    tools: tuple[str, ...] = (),
) -> RunResult:
    """One fresh cluster, one simultaneous pull on every node; with ``profile``, ``tools``
    record each agent for the pull alone (``profile_tables`` turns them into tables)."""
    size = layout.total_size
    label = f"{mode:6s} N={nodes:<2d} {size / MiB:6.1f}MiB"
    t0 = time.monotonic()
    shutil.rmtree(workdir, ignore_errors=True)
    with Cluster(workdir, nodes, mode=mode, rate_mbit=rate_mbit, mtu=mtu,
                 origin_storage=storage) as c:
        setup = time.monotonic() - t0
        ref = c.ref(REPO, TAG)
        mark = c.origin_mark()
        tag = f"n{nodes}-{size // MiB}mib-{int(time.time())}"
        pids = {f"{n}-agent": pid for n, pid in c.agent_pids().items()}
        with Recorders(profile, tag, pids, tools):
            announces = _announces(c) if profile else 0
            switches = {n: _switches(pid) for n, pid in c.agent_pids().items()}
            cpu0 = cpu_times()
            agents = CpuTime(c.agent_pids())
            results: list[NodeResult] = c.pull_all(
                ref,
                expected_digest=layout.manifest_digest,
                expected_bytes=size,
                progress=_progress_printer(label),  # type: ignore[arg-type]
                timeout=timeout,
            )
            cpu1 = cpu_times()
            agent_cpu = agents.used()
            announces = _announces(c) - announces if profile else 0
            switches = {n: _switches(pid) - switches[n] for n, pid in c.agent_pids().items()}
            threads = {n: _thread_cpu(pid) for n, pid in c.agent_pids().items()}
        egress = c.origin_egress(mark)
        if sys.stderr.isatty():
            sys.stderr.write("\n")
        failed = [r for r in results if not r.ok]
        error = ""
        if failed:
            error = f"{len(failed)}/{nodes} failed; {failed[0].node}: {failed[0].error[-300:]}"
            for name, tail in c.logs():
                if tail.strip():
                    print(f"--- {name}\n{tail}", file=sys.stderr)
    if profile is not None:  # the agents log their events when they stop
        for name in c.node_names:
            log = workdir / name / "agent.log"
            if log.exists():
                shutil.copy(log, profile / f"{tag}-{name}-agent.log")
        (profile / f"{tag}-tracker-announces.txt").write_text(f"{announces}\n")
        for name, per in switches.items():  # total, then "tid switches CPU-s" by thread
            (profile / f"{tag}-{name}-agent.switches").write_text("".join(
                [f"{per.total()}\n"] + [f"{tid} {n} {threads[name].get(tid, 0):.3f}\n"
                                        for tid, n in sorted(per.items())]))  # fmt: skip
    secs = [r.seconds for r in results]
    res = RunResult(
        mode=mode,
        nodes=nodes,
        image_bytes=size,
        rate_mbit=rate_mbit,
        ok=not failed,
        all_done_s=max(secs),
        p50_s=percentile(secs, 50),
        p99_s=percentile(secs, 99),
        origin_egress_bytes=egress,
        lower_bound_s=lower_bound(size, nodes, rate_mbit),
        setup_s=setup,
        error=error,
        swarm_bytes=sum(r.sources.get("swarm", 0) for r in results),
        agent_origin_bytes=sum(r.sources.get("origin", 0) for r in results),
        node_upload_bytes=sum(r.tx_bytes for r in results),
        node_seconds=secs,
        cpu_busy=(cpu1[0] - cpu0[0]) / max(1, cpu1[1] - cpu0[1]),
        agent_cpu_s=[agent_cpu[n] for n in sorted(agent_cpu, key=c.node_names.index)],
    )
    print(
        f"{label}: all done {res.all_done_s:6.2f}s p50 {res.p50_s:6.2f}s "
        f"egress {res.egress_ratio:5.2f}x image, {res.lb_ratio:5.2f}x lower bound, "
        f"CPU {100 * res.cpu_busy:3.0f}% busy"
        + (f", agent {cpu_per_gib_cell(res)} CPU-s/GiB per node" if res.agent_cpu_s else "")
        + ("" if res.ok else f"  FAILED: {error}"),
        flush=True,
    )
    return res


def _switches(pid: int) -> Counter:
    """Context switches (voluntary and not) of each thread of a process so far, by thread id."""
    per: Counter = Counter()
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        try:
            text = status.read_text()
        except OSError:  # a thread that just ended
            continue
        per[int(status.parent.name)] = sum(
            int(line.split()[1]) for line in text.splitlines()
            if line.endswith("ctxt_switches", 0, line.find(":")))  # fmt: skip
    return per


def _thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of a process so far, by thread id."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(stat.parent.name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _announces(c: Cluster) -> int:
    """Announces the cluster's trackers have answered so far."""
    total = 0
    for name in c.tracker_names:
        for line in c.role_metrics(name).splitlines():
            if line.startswith("p2p_tracker_announces_total "):
                total += int(float(line.split()[1]))
    return total


def cpu_per_gib_cell(r: RunResult) -> str:
    """Agents' CPU-s per GiB delivered: the median node, with the range over the nodes."""
    per = r.agent_cpu_per_gib
    if not per:
        return "-"
    mid = f"{percentile(per, 50):.2f}"
    return mid if len(per) == 1 else f"{mid} ({min(per):.2f}-{max(per):.2f})"


def fmt_size(n: int) -> str:
    return f"{n / MiB:.1f} MiB"


def write_markdown(path: Path, runs: list[RunResult], command: str, meta: dict[str, str]) -> None:
    lines = [
        "# Distribution benchmark: direct vs pull-through cache vs p2p-mirror",
        "",
        "Produced by:",
        "",
        "```",
        command,
        "```",
        "",
        *[f"- {k}: {v}" for k, v in meta.items()],
        "",
        "Every run is a fresh cluster of network namespaces; each node, the origin, the cache and",
        "the seeder have the same `tc tbf` link (rate both ways). All N nodes start `ctr image",
        "pull` at the same instant, without ctr's progress bars (`ctr --debug`), as a kubelet",
        "pulls: the bars poll containerd ten times a second, CPU that the lab's nodes share.",
        "*all done*: until the last node finished; *egress*: bytes",
        "the origin registry sent (its access log) divided by the image size; *lower bound*:",
        "max(image / link rate, N x image / ((N+1) x link rate)), TCP/IP headers not removed",
        "(0.7% of a link at MTU 9000, 4.6% at 1500); *peers*: share of the agents' blob bytes",
        "that came from the swarm (seeder included); *node upload*: bytes all pulling nodes",
        "sent on their links (what they served each other, plus request overhead), divided by",
        "the image size; *CPU busy*: share of the machine's CPU time in use during the pull",
        "(all processes; near 100% the run is CPU-bound, not link-bound). *agent CPU-s/GiB*:",
        "each node's agent process (user + system, psutil, from the pull's start to its end)",
        "divided by the image bytes it delivered; the median node (the range over the nodes).",
        "*CPU-bound* in",
        f"the status: at least {100 * CPU_BOUND:.0f}% busy, so that row measured this machine's",
        "cores, which run every node of the lab, rather than the links. With `--repeat K`,",
        "each row is the median of K fresh runs (all done, with the range of the K in",
        "brackets) and every other figure is that median run's.",
        "",
    ]
    for size in sorted({r.image_bytes for r in runs}):
        lines += [
            f"## Image {fmt_size(size)}",
            "",
            "| mode | N | all done (s) | p50 (s) | p99 (s) | origin egress / image | "
            "lower bound (s) | all done / lower bound | from peers | node upload / image "
            "| CPU busy | agent CPU-s/GiB per node | status |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in sorted((r for r in runs if r.image_bytes == size),
                        key=lambda r: (MODES.index(r.mode), r.nodes)):  # fmt: skip
            total = r.swarm_bytes + r.agent_origin_bytes
            peers = f"{100 * r.swarm_bytes / total:.0f}%" if r.mode == "p2p" and total else "-"
            status = "ok" if r.ok else f"FAILED: {r.error[:120]}".replace("|", "/")
            if r.ok and r.cpu_busy >= CPU_BOUND:
                status = "ok, CPU-bound"
            done = f"{r.all_done_s:.2f}"
            if len(r.all_done_runs) > 1:
                done += f" ({min(r.all_done_runs):.2f}-{max(r.all_done_runs):.2f})"
            lines.append(
                f"| {r.mode} | {r.nodes} | {done} | {r.p50_s:.2f} | {r.p99_s:.2f} | "
                f"{r.egress_ratio:.2f} | {r.lower_bound_s:.2f} | {r.lb_ratio:.2f} | {peers} | "
                f"{r.node_upload_bytes / r.image_bytes:.2f} | {100 * r.cpu_busy:.0f}% | "
                f"{cpu_per_gib_cell(r)} | {status} |"
            )
        lines.append("")
    path.write_text("\n".join(lines))


def write_plot(path: Path, runs: list[RunResult]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r.image_bytes for r in runs})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4.2), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        sub = [r for r in runs if r.image_bytes == size]
        for mode in MODES:
            pts = sorted((r.nodes, r.all_done_s) for r in sub if r.mode == mode and r.ok)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=mode)
        ns = sorted({r.nodes for r in sub})
        lb = [lower_bound(size, n, sub[0].rate_mbit) for n in ns]
        ax.plot(ns, lb, linestyle="--", color="grey", label="lower bound")
        ax.set_title(f"image {fmt_size(size)}, {sub[0].rate_mbit:g} Mbit/s links")
        ax.set_xlabel("nodes pulling at once (N)")
        ax.set_ylabel("time until all nodes done (s)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _csv(kind: type, text: str) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--nodes", default="1,2,4,8,16", show_default=True, help="Comma-separated N.")
@click.option("--sizes", default="16MiB,64MiB", show_default=True, help="Image sizes.")
@click.option("--modes", default=",".join(MODES), show_default=True)
@click.option("--rate-mbit", default=20.0, show_default=True, help="Every link, both ways.")
@click.option("--mtu", default=DEFAULT_MTU, show_default=True,
              type=click.IntRange(*MTU_RANGE), help="Every link's MTU (bytes).")
@click.option("--layers", default=4, show_default=True, help="Layers per image.")
@click.option("--seed", default=42, show_default=True)
@click.option("--timeout", default=900.0, show_default=True, help="Per pull, seconds.")
@click.option("--repeat", default=1, show_default=True, type=click.IntRange(1, 9),
              help="Fresh runs per row; the report keeps the median (run to run, all done "
              "moves by ~0.3-1 s).")  # fmt: skip
@click.option("--workdir", type=click.Path(path_type=Path), default=None,
              help="Scratch space [a temp dir under /var/tmp].")  # fmt: skip
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS, show_default=True)
@click.option("--keep-workdir", is_flag=True, help="Keep logs and data for inspection.")
@click.option("--profile", type=click.Path(path_type=Path), default=None,
              help="Record every agent during the pull alone (--profile-tools) into this dir "
              "and write its tables to DIR/profile.md.")  # fmt: skip
@click.option("--profile-tools", default="perf,py-spy-nonblocking", show_default=True,
              help="perf (every thread, native and kernel), py-spy-nonblocking (Python "
              "stacks, without stopping the agent).")  # fmt: skip
@click.option("--merge", is_flag=True,
              help="Keep the rows of the report already in --out that this run does not "
              "measure (same links only); the report lists both commands.")  # fmt: skip
def main(
    nodes: str, sizes: str, modes: str, rate_mbit: float, mtu: int, layers: int, seed: int,
    timeout: float, repeat: int, workdir: Path | None, out: Path, keep_workdir: bool,
    merge: bool, profile: Path | None, profile_tools: str,
) -> None:  # fmt: skip
    """Run direct / cache / p2p side by side for each N and image size; write the report."""
    if os.geteuid() != 0:
        raise click.UsageError("needs root (network namespaces, tc, containerd)")
    earlier = _earlier_report(out / "distribute.json", links(rate_mbit, mtu)) if merge else None
    exit_on_signals()
    cleanup_stale()  # leftovers of crashed runs (dead PIDs, our prefix only)
    node_counts = _csv(int, nodes)
    image_sizes = [parse_size(s) for s in sizes.split(",") if s.strip()]
    mode_list = [m.strip() for m in modes.split(",") if m.strip()]
    bad = set(mode_list) - set(MODES)
    if bad:
        raise click.UsageError(f"unknown modes {sorted(bad)}; choose from {MODES}")
    command = "python -m bench.distribute " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    scratch = workdir or Path(tempfile.mkdtemp(prefix="p2pm-bench-", dir="/var/tmp"))
    scratch.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if profile is not None:
        profile.mkdir(parents=True, exist_ok=True)
    runs: list[RunResult] = []
    started = time.monotonic()
    try:
        for i, size in enumerate(image_sizes):
            img_dir = scratch / f"image{i}"
            shutil.rmtree(img_dir, ignore_errors=True)
            layout, storage = prepare_image(img_dir, size, layers, seed + i)
            print(f"image {fmt_size(layout.total_size)} ({layers} layers) ready", flush=True)
            for n in node_counts:
                for mode in mode_list:
                    tries = [run_one(scratch / "run", mode, n, layout, storage, rate_mbit,
                                     timeout, mtu, profile, tuple(profile_tools.split(",")))
                             for _ in range(repeat)]  # fmt: skip
                    runs.append(median_run(tries))
                    _write_all(out, runs, command, rate_mbit, mtu, started, earlier)
    finally:
        if runs:
            _write_all(out, runs, command, rate_mbit, mtu, started, earlier)
            print(f"wrote {out}/distribute.md, .png, .json", flush=True)
        if profile is not None and runs:
            (profile / "profile.md").write_text(profile_tables(profile))
            print(f"wrote {profile}/profile.md", flush=True)
        if not keep_workdir and workdir is None:
            shutil.rmtree(scratch, ignore_errors=True)


def profile_tables(directory: Path) -> str:
    """Where the agents' CPU went during the pulls (``bench.cpu_profile``'s tables over every
    agent recorded), and what each agent did per pull (from the lines it logs at exit)."""
    lines = role_tables(directory, "*-agent")
    events: dict[str, Counter] = defaultdict(Counter)
    agents = 0
    for log in sorted(directory.glob("*-agent.log")):
        agents += 1
        for line in log.read_text().splitlines():
            m = re.search(r"swarm events: (\d+) torrents added, (\d+) alert pops, alerts (\{.*\})",
                          line)  # fmt: skip
            if m:
                events["torrents added"][""] += int(m.group(1))
                events["alert pops (pop_alerts calls)"][""] += int(m.group(2))
                for kind, n in ast.literal_eval(m.group(3)).items():
                    events["alerts"][kind] += n
            m = re.search(r"seeder requests: (\{.*\})", line)
            if m:
                for kind, n in ast.literal_eval(m.group(1)).items():
                    events["seeder requests"][kind] += n
    for f in directory.glob("*-tracker-announces.txt"):
        events["tracker announces (all trackers)"][""] += int(f.read_text())
    for f in directory.glob("*-agent.switches"):
        events["context switches (all threads)"][""] += int(f.read_text().split()[0])
    if agents:
        lines += [f"**Events per agent per pull** (mean of {agents} agents)", "",
                  "| count | what |", "|---:|---|"]  # fmt: skip
        for what, counts in events.items():
            for kind, n in counts.most_common():
                lines.append(f"| {n / agents:.1f} | {what}{': ' + kind if kind else ''} |")
        lines.append("")
    return "\n".join(lines)


def links(rate: float, mtu: int) -> str:
    """The report's links line: ``--merge`` mixes only reports whose lines are equal."""
    return f"{rate:g} Mbit/s each way (tbf) on every node, MTU {mtu}"


def _earlier_report(path: Path, on_links: str) -> dict:
    """The report ``--merge`` keeps rows of (none yet: an empty one)."""
    if not path.exists():
        return {"runs": []}
    try:
        report = json.loads(path.read_text())
        report["runs"] = [RunResult(**r) for r in report["runs"]]
    except (ValueError, KeyError, TypeError) as e:
        raise click.UsageError(f"--merge: {path} is not a report of this benchmark: {e}") from e
    if report.get("links") != on_links:
        raise click.UsageError(f"--merge: {path} was measured on other links "
                               f"({report.get('links')}), not {on_links}")  # fmt: skip
    return report


def _write_all(out: Path, runs: list[RunResult], command: str, rate: float, mtu: int,
               t0: float, earlier: dict | None = None) -> None:
    meta = {
        "machine": f"{os.cpu_count()} cores, Linux {platform.release()}, "
        f"Python {platform.python_version()}",
        "links": links(rate, mtu),
        "wall time of the whole benchmark": f"{(time.monotonic() - t0) / 60:.1f} min",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if earlier is not None and earlier["runs"]:
        runs = merge_runs(earlier["runs"], runs)
        above = earlier.get("command", "?")
        command = f"{above}\n{command}   # --merge: its rows replace those above"
        for key in ("wall time of the whole benchmark", "date"):
            meta[key] = f"{earlier.get(key, '?')}; then {meta[key]}"
    write_markdown(out / "distribute.md", runs, command, meta)
    (out / "distribute.json").write_text(json.dumps(
        {"command": command, **meta, "runs": [asdict(r) for r in runs]}, indent=1) + "\n")
    write_plot(out / "distribute.png", runs)


if __name__ == "__main__":
    main()
