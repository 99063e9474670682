"""One agent on loopback: how fast does a blob stream out of it, and how much memory does it use?

Four ways to get the same blob, each timed from request to last byte: ``origin`` (straight
from the registry), ``swarm`` (a cold agent: seeder, torrents, peers, streamed while pieces
complete, while the seeder itself still pulls from the origin), ``cache`` (a second request,
sendfile from disk) and a second cold agent once the seeder and the first agent hold the blob.
Everything shares this machine's 2 cores, so the swarm rows are CPU-bound here.
The agent's peak RSS is sampled with psutil during the swarm run.

    python -m bench.stream --size 256MiB --segment-size 16MiB
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

from lab.images import build_image, push_image
from lab.registry import Registry
from lab.stack import LocalStack
from p2p_mirror.core.config import parse_size

REG = "registry.example.test"
RESULTS = Path(__file__).resolve().parent / "results"


def timed_get(url: str) -> tuple[float, float, int, str]:
    """(seconds to first byte, seconds to last byte, bytes, sha256 hex)."""
    start = time.monotonic()
    first = 0.0
    digest = hashlib.sha256()
    total = 0
    with urllib.request.urlopen(url, timeout=600) as resp:
        while chunk := resp.read(1 << 20):
            if not total:
                first = time.monotonic() - start
            digest.update(chunk)
            total += len(chunk)
    return first, time.monotonic() - start, total, digest.hexdigest()


class PeakRSS:
    """Sample a process tree's resident memory in the background; keep the peak."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            time.sleep(0.02)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class CpuTime:
    """CPU seconds (user + system) that named processes used since construction."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.start = {name: self._cpu(p) for name, p in self.procs.items()}

    @staticmethod
    def _cpu(proc: psutil.Process) -> float:
        times = proc.cpu_times()
        return times.user + times.system

    def used(self) -> dict[str, float]:
        return {n: round(self._cpu(p) - self.start[n], 2) for n, p in self.procs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="256MiB", help="blob size")
    parser.add_argument("--segment-size", default="16MiB", help="seeder segment size")
    parser.add_argument("--log-level", default="info", help="agent log level")
    parser.add_argument("--workdir", type=Path, help="keep logs and data here")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write results")
    args = parser.parse_args()
    size = parse_size(args.size)

    with tempfile.TemporaryDirectory(prefix="p2pm-stream-") as tmp:
        work = args.workdir or Path(tmp)
        layout = build_image(work / "oci", [size], seed=5)
        layer = layout.layers[0]
        rows = []
        with Registry(work / "registry") as registry:
            push_image(layout, registry.hostport, "bench/blob", "v1")
            path = f"/v2/bench/blob/blobs/{layer.digest}?ns={REG}"
            first, total, n, sha = timed_get(f"{registry.url}{path.split('?')[0]}")
            rows.append(("origin", first, total, n, sha, 0))
            print("origin done", flush=True)
            with LocalStack(work / "stack", {REG: registry.url}, args.segment_size) as stack:
                agent = stack.add_agent("agent", log_level=args.log_level)
                cpu = CpuTime({"agent": agent.proc.pid, "seeder": stack.seeder.pid})
                with PeakRSS(agent.proc.pid) as rss:
                    first, total, n, sha = timed_get(agent.url + path)
                rows.append(("swarm (cold agent)", first, total, n, sha, rss.peak))
                print("CPU seconds during the swarm run:", cpu.used(), flush=True)
                with PeakRSS(agent.proc.pid) as rss:
                    first, total, n, sha = timed_get(agent.url + path)
                rows.append(("cache (same agent)", first, total, n, sha, rss.peak))
                other = stack.add_agent("agent2", log_level=args.log_level)
                with PeakRSS(other.proc.pid) as rss:
                    first, total, n, sha = timed_get(other.url + path)
                rows.append(("swarm (2nd agent, 2 seeds)", first, total, n, sha, rss.peak))

    lines = [
        f"Blob of {size / 2**20:.0f} MiB, segments of {args.segment_size}, loopback, "
        f"command: `python -m bench.stream --size {args.size} --segment-size {args.segment_size}`",
        "",
        "| source | first byte (s) | all bytes (s) | MB/s | digest ok | agent peak RSS (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for name, first, total, n, sha, peak in rows:
        ok = sha == layer.digest.split(":")[1] and n == layer.size
        lines.append(
            f"| {name} | {first:.3f} | {total:.2f} | {n / total / 1e6:.0f} | {ok} | "
            f"{peak / 2**20:.0f} |" if peak else
            f"| {name} | {first:.3f} | {total:.2f} | {n / total / 1e6:.0f} | {ok} | - |"
        )
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stream.md").write_text(table + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    colors = ["#888", "#2a7", "#27a", "#7a2"][: len(rows)]
    ax.bar([r[0] for r in rows], [r[3] / r[2] / 1e6 for r in rows], color=colors)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_ylabel("MB/s (request to last byte)")
    ax.set_title(f"One agent, {size / 2**20:.0f} MiB blob on loopback")
    fig.tight_layout()
    fig.savefig(args.out / "stream.png", dpi=100)


if __name__ == "__main__":
    main()
