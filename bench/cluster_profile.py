"""Where the lab's CPU goes during a cluster run: ``perf record -a`` around
``python -m bench.distribute ...``, samples put in buckets by role (agent, seeder, tracker,
containerd, registry, ...) and by activity (``bench.cpu_profile``'s buckets).

Every process on the machine is sampled, other sessions' too: only the roles this run
started (found by their command lines, polled every 0.2 s) are counted per role.

    python -m bench.cluster_profile --out /tmp/cp -- --nodes 4 --sizes 64MiB --modes p2p \\
        --rate-mbit 100 --out /tmp/cp/report
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import psutil

from bench.cpu_profile import bucket, pyspy_stacks, python_function, table

ROLES = [
    ("agent", re.compile(r"p2p_mirror agent")),
    ("seeder", re.compile(r"p2p_mirror seeder")),
    ("tracker", re.compile(r"p2p_mirror tracker")),
    ("containerd", re.compile(r"containerd")),
    ("ctr", re.compile(r"\bctr\b")),
    ("registry", re.compile(r"docker-registry|registry serve")),
]


def role_of(cmdline: str) -> str | None:
    for role, pattern in ROLES:
        if pattern.search(cmdline):
            return role
    return None


def watch(roles: dict[int, str], stop: threading.Event, mine: int, spy: list, out: Path) -> None:
    """Map the pids of this run's descendants to their roles while it runs; attach py-spy
    (non-blocking: it does not stop the process) to the first agent and the seeder."""
    while not stop.is_set():
        try:
            for proc in psutil.Process(mine).children(recursive=True):
                if proc.pid not in roles:
                    role = role_of(" ".join(proc.cmdline()))
                    if role:
                        roles[proc.pid] = role
                    if role in ("agent", "seeder") and role not in {r for r, _ in spy}:
                        spy.append((role, subprocess.Popen(
                            ["py-spy", "record", "--nonblocking", "--threads", "--rate", "100",
                             "--format", "raw", "-o", str(out / f"{role}.pyspy.txt"),
                             "-p", str(proc.pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))  # fmt: skip
        except psutil.Error:
            pass
        time.sleep(0.2)


def samples(data: Path) -> list[tuple[int, int, str, str]]:
    """(pid, tid, dso, symbol) per perf sample."""
    out = subprocess.run(
        ["perf", "script", "-i", str(data), "-F", "pid,tid,ip,sym,dso"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rows = []
    for line in out.splitlines():
        m = re.match(r"\s*(\d+)/(\d+)\s+\S+\s+(.*?)\s*\((.*)\)\s*$", line)
        if m:
            rows.append((int(m.group(1)), int(m.group(2)), Path(m.group(4)).name or m.group(4),
                         m.group(3).split("+")[0]))  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--freq", type=int, default=199)
    parser.add_argument("distribute", nargs=argparse.REMAINDER, help="-- then its arguments")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "perf.data"
    extra = [a for a in args.distribute if a != "--"]
    perf = subprocess.Popen(["perf", "record", "-q", "-a", "-F", str(args.freq), "-o", str(data)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    time.sleep(1)
    roles: dict[int, str] = {}
    stop = threading.Event()
    run = subprocess.Popen([sys.executable, "-m", "bench.distribute", *extra])
    spy: list[tuple[str, subprocess.Popen]] = []
    watcher = threading.Thread(target=watch, args=(roles, stop, run.pid, spy, args.out),
                               daemon=True)  # fmt: skip
    watcher.start()
    run.wait()
    stop.set()
    perf.send_signal(signal.SIGINT)
    perf.wait()
    watcher.join()
    for _, proc in spy:  # their processes ended with the run: py-spy writes and exits
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            proc.wait(30)
    by_role: Counter = Counter()
    by_bucket: dict[str, Counter] = defaultdict(Counter)
    total = 0
    for pid, _tid, dso, sym in samples(data):
        total += 1
        role = roles.get(pid, "other processes (this run's and other sessions')")
        by_role[role] += 1
        by_bucket[role][bucket(dso, sym)] += 1
    lines = table("CPU by process role (perf -a, whole machine)", by_role, total, 10)
    for role in ("agent", "seeder"):
        n = sum(by_bucket[role].values())
        if n:
            lines += table(f"{role} (all of them): CPU by activity", by_bucket[role], n, 10)
    for role, _ in spy:
        py: Counter = Counter()
        for _, name, frames, n in pyspy_stacks(args.out / f"{role}.pyspy.txt"):
            what = python_function(frames)
            if what is not None:
                py[f"{re.sub(r'_[0-9]+$', '_N', name)}: {what}"] += n
        if py:
            lines += table(f"one {role}: Python by function (py-spy --nonblocking, active "
                           "samples, whole run)", py, sum(py.values()), 15)  # fmt: skip
    text = "\n".join(lines)
    print(text)
    (args.out / "cluster-profile.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
