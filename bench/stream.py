"""One agent on loopback: how fast does a blob stream out of it, and what CPU and memory does
each role spend per byte?

Every row is one ``curl -o /dev/null`` (a client that is not itself the bottleneck), timed
from request to last byte: ``origin`` (straight from the registry), ``swarm (cold agent)``
(seeder, torrents, peers, streamed while pieces complete, while the seeder itself still pulls
from the origin), ``cache`` (a second request to the same agent) and a second cold agent once
the seeder and the first agent hold the blob. For each row the CPU seconds (user + system,
psutil, sampled before and after; the client's from its rusage) of every role are divided by
the GiB that row moved: per GiB delivered for the agents and the client, per GiB of the blob
for the seeder (which ingests it from the origin and deals it out). Agent peak RSS is
sampled every 20 ms. Targets (issue 24) are printed next to the figures.

Everything shares this machine's cores with whatever else runs on it: run it a few times
(``--repeat``) and look at the spread.

``--profile DIR`` also records the cold-agent row with ``perf record`` (every thread,
native and kernel) and ``py-spy record --native --threads`` (Python stacks) attached to the
agent and the seeder, and the 2nd-agent row attached to both agents (``run*-second-*``);
``python -m bench.cpu_profile DIR`` turns them into tables (``--roles '*-agent2'``).
With ``BENCH_SMAPS=FILE`` in the environment, each time an agent's anonymous memory rises by
8 MiB past its peak, the anonymous MiB per kind of mapping (``smaps_breakdown``) is appended
to FILE.

    python -m bench.stream --size 256MiB --segment-size 16MiB --repeat 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from lab.images import build_image, push_image
from lab.procs import CpuTime
from lab.registry import Registry
from lab.stack import LocalStack
from p2p_mirror.core.config import parse_size

REG = "registry.example.test"
RESULTS = Path(__file__).resolve().parent / "results"
GiB = 2**30
MiB = 2**20

# issue 24's targets: (figure, comparison, bound)
TARGETS = {
    "cold MB/s": (">=", 500),
    "cache MB/s": (">=", 3000),
    "agent RSS MiB": ("<=", 120),
    "agent CPU-s/GiB": ("<=", 2.0),
    "seeder CPU-s/GiB": ("<=", 1.5),
}


@dataclass
class Fetch:
    first: float  # seconds to first byte
    total: float  # seconds to last byte
    size: int
    status: int
    client_cpu: float  # curl's own user + system seconds

    @property
    def mbps(self) -> float:
        return self.size / self.total / 1e6 if self.total else 0.0


def curl(url: str) -> Fetch:
    """GET ``url`` into /dev/null with curl; its CPU from the kernel's rusage of the child."""
    proc = subprocess.Popen(
        ["curl", "-sS", "-o", "/dev/null", "--max-time", "600", "-w",
         "%{time_starttransfer} %{time_total} %{size_download} %{http_code}", url],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    out = proc.stdout.read().decode() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"curl {url} failed ({proc.returncode}): {out}")
    first, total, size, code = out.split()
    return Fetch(float(first), float(total), int(size), int(code),
                 usage.ru_utime + usage.ru_stime)  # fmt: skip


def smaps_breakdown(pid: int) -> dict[str, int]:
    """MiB of anonymous memory per kind of mapping: ``[heap]``, ``anon<8M`` (Python's
    256 KiB arenas, thread stacks, small mmaps), ``anonNM`` (the used part of one larger
    anonymous mapping, e.g. a glibc per-thread arena, whose reserve is 64 MiB)."""
    kinds: dict[str, int] = {}
    name = ""
    size = 0
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and not parts[0].endswith(":"):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                size = hi - lo
                name = parts[5] if len(parts) > 5 else ""
            elif parts[0] == "Anonymous:":
                kb = int(parts[1])
                if not kb:
                    continue
                if name == "":
                    key = f"anon{size >> 20}M" if size >= 8 * MiB else "anon<8M"
                elif name.startswith("["):
                    key = name
                else:
                    key = "file:" + name.rsplit("/", 1)[-1][:20]
                kinds[key] = kinds.get(key, 0) + kb
    return {k: v >> 10 for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]) if v >= 1024}


class PeakRSS:
    """Sample a process tree's resident memory in the background; keep the peak."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self.peak_anon = 0  # without file pages mapped (libtorrent maps the files it serves)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                mems = [p.memory_info() for p in procs]
                self.peak = max(self.peak, sum(m.rss for m in mems))
                anon = sum(m.rss - m.shared for m in mems)
                # each read of smaps stalls the process's page faults: only on 8 MiB rises
                if anon > self.peak_anon + 8 * MiB and os.environ.get("BENCH_SMAPS"):
                    kinds = smaps_breakdown(self.proc.pid)
                    with open(os.environ["BENCH_SMAPS"], "a") as out:
                        print(self.proc.pid, f"{time.time():.2f}", anon >> 20, kinds, file=out)
                self.peak_anon = max(self.peak_anon, anon)
            except psutil.Error:
                pass
            time.sleep(0.02)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Recorders:
    """perf and py-spy attached to processes for the duration of a ``with`` block."""

    def __init__(self, out: Path | None, tag: str, pids: dict[str, int],
                 tools: tuple[str, ...] = ("perf", "py-spy")) -> None:
        self.out, self.tag, self.pids, self.tools = out, tag, pids, tools
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> Recorders:
        if self.out is None:
            return self
        self.out.mkdir(parents=True, exist_ok=True)
        for role, pid in self.pids.items():
            base = self.out / f"{self.tag}-{role}"
            if "perf" in self.tools and shutil.which("perf"):
                self.procs.append(subprocess.Popen(
                    ["perf", "record", "-q", "-F", "499", "-p", str(pid), "-o",
                     f"{base}.perf.data"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
            spy = [tool for tool in self.tools if tool.startswith("py-spy")]
            if spy and shutil.which("py-spy"):
                # --native stops the process per sample; py-spy-nonblocking does not (and
                # names no native frames: a syscall counts as its Python caller's time)
                how = (["--nonblocking", "--rate", "400"] if spy[0] == "py-spy-nonblocking"
                       else ["--native", "--rate", "50"])  # fmt: skip
                self.procs.append(subprocess.Popen(
                    ["py-spy", "record", *how, "--threads",
                     "--format", "raw", "-o", f"{base}.pyspy.txt", "-p", str(pid)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
        time.sleep(1.0)  # both attach before the first byte moves
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGINT)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass
class Row:
    name: str
    fetch: Fetch
    cpu: dict[str, float]  # role -> CPU seconds during the row
    rss: int = 0
    ok: bool = True
    anon: int = 0
    per_gib: dict[str, float] = field(default_factory=dict)


def cpu_per_gib(cpu: dict[str, float], delivered: int, blob: int) -> dict[str, float]:
    """CPU-s per GiB: the seeder's per GiB of the blob, everyone else's per GiB delivered."""
    return {role: s / ((blob if role == "seeder" else delivered) / GiB)
            for role, s in cpu.items()}  # fmt: skip


def one_run(size: int, segment: str, log_level: str, profile: Path | None, run: int,
            tools: tuple[str, ...] = ("perf", "py-spy")) -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="p2pm-stream-") as tmp:
        work = Path(tmp)
        layout = build_image(work / "oci", [size], seed=5 + run)
        layer = layout.layers[0]
        with Registry(work / "registry") as registry:
            push_image(layout, registry.hostport, "bench/blob", "v1")
            path = f"/v2/bench/blob/blobs/{layer.digest}?ns={REG}"
            f = curl(f"{registry.url}{path.split('?')[0]}")
            rows.append(Row("origin", f, {"client": f.client_cpu}, ok=f.size == layer.size))
            with LocalStack(work / "stack", {REG: registry.url}, segment) as stack:
                assert stack.seeder is not None
                agent = stack.add_agent("agent", log_level=log_level)
                pids = {"agent": agent.proc.pid, "seeder": stack.seeder.pid}
                with Recorders(profile, f"run{run}-cold", pids, tools):
                    cpu = CpuTime(pids)
                    with PeakRSS(agent.proc.pid) as rss:
                        f = curl(agent.url + path)
                    used = cpu.used()
                ok = f.size == layer.size and agent.metric("blob_failures_total") == 0
                rows.append(Row("swarm (cold agent)", f, {**used, "client": f.client_cpu},
                                rss.peak, ok, rss.peak_anon))  # fmt: skip
                cpu = CpuTime({"agent": agent.proc.pid})
                with PeakRSS(agent.proc.pid) as rss:
                    f = curl(agent.url + path)
                rows.append(Row("cache (same agent)", f,
                                {**cpu.used(), "client": f.client_cpu}, rss.peak,
                                f.size == layer.size, rss.peak_anon))  # fmt: skip
                other = stack.add_agent("agent2", log_level=log_level)
                pids = {"agent2": other.proc.pid, "agent (seeding)": agent.proc.pid,
                        "seeder": stack.seeder.pid}  # fmt: skip
                rec = {"agent2": other.proc.pid, "agent1": agent.proc.pid}  # agent1: seeding
                with Recorders(profile, f"run{run}-second", rec, tools):
                    cpu = CpuTime(pids)
                    with PeakRSS(other.proc.pid) as rss:
                        f = curl(other.url + path)
                ok = f.size == layer.size and other.metric("blob_failures_total") == 0
                rows.append(Row("swarm (2nd agent, 2 seeds)", f,
                                {**cpu.used(), "client": f.client_cpu}, rss.peak, ok,
                                rss.peak_anon))  # fmt: skip
    for row in rows:
        # the seeder ingests the blob only in the cold row; later it only deals/seeds
        blob = size if row.name.startswith("swarm (cold") else row.fetch.size
        row.per_gib = cpu_per_gib(row.cpu, row.fetch.size, blob)
    return rows


def spread(values: list[float], fmt: str) -> str:
    """``median (min-max)`` of repeated runs, or the single value."""
    if len(values) == 1:
        return format(values[0], fmt)
    return (f"{format(statistics.median(values), fmt)} "
            f"({format(min(values), fmt)}-{format(max(values), fmt)})")  # fmt: skip


def meets(figure: str, value: float) -> str:
    op, bound = TARGETS[figure]
    ok = value >= bound if op == ">=" else value <= bound
    return f"{op} {bound:g}: {'yes' if ok else 'NO'}"


def report(runs: list[list[Row]], size: int, args: argparse.Namespace) -> str:
    n = len(runs)
    lines = [
        f"Blob of {size / MiB:.0f} MiB, segments of {args.segment_size}, loopback, {n} run(s) "
        f"(median (min-max)), {os.cpu_count()} cores shared, command: `python -m bench.stream "
        f"--size {args.size} --segment-size {args.segment_size} --repeat {args.repeat}`",
        "",
        "| source | first byte (s) | all bytes (s) | MB/s | ok | agent peak RSS (MiB); without "
        "mapped files "
        "| CPU-s per GiB by role |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, name in enumerate(r.name for r in runs[0]):
        rows = [run[i] for run in runs]
        roles = rows[0].per_gib.keys()
        cpu = ", ".join(f"{role} {spread([r.per_gib[role] for r in rows], '.2f')}"
                        for role in roles)  # fmt: skip
        rss = (f"{spread([r.rss / MiB for r in rows], '.0f')}; anon "
               f"{spread([r.anon / MiB for r in rows], '.0f')}" if rows[0].rss else "-")
        lines.append(
            f"| {name} | {spread([r.fetch.first for r in rows], '.3f')} "
            f"| {spread([r.fetch.total for r in rows], '.2f')} "
            f"| {spread([r.fetch.mbps for r in rows], '.0f')} "
            f"| {all(r.ok for r in rows)} | {rss} | {cpu} |"
        )
    cold = [run[1] for run in runs]
    cache = [run[2] for run in runs]
    second = [run[3] for run in runs]
    figures = {
        "cold MB/s": [r.fetch.mbps for r in cold],
        "cache MB/s": [r.fetch.mbps for r in cache],
        "agent RSS MiB": [max(r.rss for r in run[1:]) / MiB for run in runs],
        "agent CPU-s/GiB": [max(c.per_gib["agent"], s.per_gib["agent2"])
                            for c, s in zip(cold, second, strict=True)],  # fmt: skip
        "seeder CPU-s/GiB": [r.per_gib["seeder"] for r in cold],
    }
    lines += ["", "| figure (issue 24) | measured | target |", "|---|---|---|"]
    for figure, values in figures.items():
        lines.append(f"| {figure} | {spread(values, '.2f' if 'CPU' in figure else '.0f')} "
                     f"| {meets(figure, statistics.median(values))} |")  # fmt: skip
    lines.append("")
    lines.append("agent CPU-s/GiB: the worse of the cold agent and the 2nd agent; seeder: "
                 "ingest from the origin and dealing, in the cold row.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="256MiB", help="blob size")
    parser.add_argument("--segment-size", default="16MiB", help="seeder segment size")
    parser.add_argument("--log-level", default="info", help="agent log level")
    parser.add_argument("--repeat", type=int, default=1, help="runs, each with a fresh stack")
    parser.add_argument("--profile", type=Path, help="perf + py-spy the cold row into this dir")
    parser.add_argument("--tools", default="perf,py-spy",
                        help="profilers for --profile (py-spy stops the process per sample: "
                        "it slows the run several times; perf alone costs little; "
                        "py-spy-nonblocking does not stop it)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write results")
    parser.add_argument("--name", default="stream", help="results file name (without .md)")
    args = parser.parse_args()
    size = parse_size(args.size)
    runs = []
    for run in range(args.repeat):
        runs.append(one_run(size, args.segment_size, args.log_level, args.profile, run,
                            tuple(args.tools.split(","))))
        print(f"run {run + 1}/{args.repeat}: " + ", ".join(
            f"{r.name} {r.fetch.mbps:.0f} MB/s" for r in runs[-1]), flush=True)  # fmt: skip
    table = report(runs, size, args)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.md").write_text(table + "\n")
    plot(runs, size, args.out / f"{args.name}.png")


def plot(runs: list[list[Row]], size: int, path: Path) -> None:
    """Median MB/s per row, as a bar chart (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = [r.name for r in runs[0]]
    mbps = [statistics.median(run[i].fetch.mbps for run in runs) for i in range(len(names))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(names, mbps, color=["#888", "#2a7", "#27a", "#7a2"][: len(names)])
    ax.tick_params(axis="x", labelsize=7)
    ax.set_ylabel("MB/s (curl, request to last byte)")
    ax.set_title(f"One agent, {size / MiB:.0f} MiB blob on loopback")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
