"""Where a role's CPU goes: tables from the ``perf`` and ``py-spy`` recordings that
``python -m bench.stream --profile DIR`` (or ``bench.cluster_profile``) left in DIR.

``perf record`` samples every thread of the process, native and kernel, at a fixed rate, so
its shares are shares of CPU time. Each sample is put in a bucket by where it ran (kernel
symbol, libcrypto's SHA, libtorrent, the interpreter, libc) and by thread; threads are
named from py-spy's recording of the same run (Python threads: the event loop
``MainThread``, ``asyncio_N`` for ``to_thread``), the rest are libtorrent's own native
threads. py-spy's stacks then say which Python function the interpreter's share belongs to.

    python -m bench.cpu_profile /tmp/prof --md bench/results/cpu-profile.md
"""

from __future__ import annotations

import argparse
import re
import subprocess
from collections import Counter, defaultdict
from pathlib import Path

# kernel and library symbols -> what they are doing, first match wins
BUCKETS = [
    ("kernel: copy into page cache (file write)", r"copy_folio_from_iter|generic_perform_write"
     r"|shmem_write|ext4_da_write|iomap_write|filemap_add|__filemap|folio_"),
    ("kernel: page faults / zeroing new memory", r"clear_page|exc_page_fault|handle_mm_fault"
     r"|do_anonymous|__pi_memset|do_user_addr_fault|memcg|alloc_pages|rmqueue|get_page_from"),
    ("kernel: copy to/from user (read, recv, send)", r"_copy_to_iter|_copy_from_iter"
     r"|copy_user|rep_movs|copy_page_to_iter|skb_copy|memcpy_orig|__memcpy"),
    ("kernel: scheduler, wakeups, futex", r"finish_task_switch|_raw_spin_unlock|schedule|futex"
     r"|try_to_wake|__wake_up|ttwu|enqueue_task|dequeue_task|select_task|idle"),
    ("kernel: TCP/IP stack", r"tcp_|ip_|skb|__dev_queue|net_rx|__netif|sock_|inet_|loopback"),
    ("kernel: syscall entry/exit", r"syscall|entry_SYSCALL|irqentry|__get_user|__put_user"
     r"|exit_to_user"),
]


def bucket(dso: str, sym: str) -> str:
    if dso.startswith("[kernel"):
        for name, pattern in BUCKETS:
            if re.search(pattern, sym):
                return name
        return "kernel: other"
    if "libcrypto" in dso:
        return "SHA-1/SHA-256 (libcrypto)"
    if dso.startswith("__init__.cpython") or "libtorrent" in dso:
        if "add_piece_bytes" in sym:
            return "libtorrent binding: add_piece (copies the piece)"
        return "libtorrent (C++)"
    if "libpython" in dso or dso == "python" or dso.endswith("python3.11"):
        return "Python interpreter (see py-spy table)"
    if "libc.so" in dso:
        if "mem" in sym:
            return "libc memcpy/memset"
        return "libc other (malloc, locks)"
    if "_http" in dso or "aiohttp" in dso or "_websocket" in dso:
        return "aiohttp C parts"
    return f"other: {dso}"


def perf_samples(path: Path) -> list[tuple[int, str, str]]:
    """(tid, dso, symbol) per perf sample."""
    out = subprocess.run(
        ["perf", "script", "-i", str(path), "-F", "tid,ip,sym,dso"],
        capture_output=True, text=True, check=True,
    ).stdout
    samples = []
    for line in out.splitlines():
        m = re.match(r"\s*(\d+)\s+\S+\s+(.*?)\s*\((.*)\)\s*$", line)
        if m:
            sym = m.group(2).split("+")[0]
            samples.append((int(m.group(1)), Path(m.group(3)).name or m.group(3), sym))
    return samples


def pyspy_stacks(path: Path) -> list[tuple[int | None, str, list[str], int]]:
    """(tid, thread name, frames outermost first, count) per py-spy raw line."""
    stacks = []
    if not path.exists():
        return stacks
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        m = re.match(r"thread \((\w+)\)(?::\s*(\S+))?", frames[0])
        tid = name = None
        if m:
            tid = int(m.group(1), 0) if m.group(1).isdigit() else None
            name = m.group(2) or m.group(1)
            frames = frames[1:]
        if frames and not frames[0].startswith(("process", "thread")) and frames[0] == name:
            frames = frames[1:]
        stacks.append((tid, name or "?", frames, int(count)))
    return stacks


def thread_names(stacks) -> dict[int, str]:
    names = {}
    for tid, name, _, _ in stacks:
        # py-spy leaves a thread's name out of some samples: keep the name it gave
        if tid is not None and (tid not in names or name != str(tid)):
            names[tid] = re.sub(r"_\d+$", "_N", name)
    return names


IDLE = ("SimpleQueue_get", "epoll_wait", "pthread_cond", "sem_timedwait", "sem_wait",
        "PyThread_acquire_lock", "select (", "poll (")


def python_function(frames: list[str]) -> str | None:
    """``innermost p2p_mirror/aiohttp/asyncio function / the named native call below it``,
    or None for a thread waiting (py-spy's idle detection misses native waits)."""
    if any(any(i in f for i in IDLE) for f in frames[-4:]):
        return None
    ours = [i for i, f in enumerate(frames) if "p2p_mirror/" in f]
    ours = ours or [i for i, f in enumerate(frames) if "aiohttp/" in f or "asyncio/" in f]
    at = ours[-1] if ours else len(frames) - 1
    name = re.sub(r"\s*\(.*?([\w]+\.py):\d+\)", r" (\1)", frames[at]) if frames else "?"
    native = [re.sub(r"\s*\(.*\)", "", f) for f in frames[at + 1 :]
              if ".py:" not in f and not f.startswith("0x") and ".c" not in f]  # fmt: skip
    return f"{name} / {native[-1]}" if native else name


def table(title: str, counts: Counter, total: int, top: int = 12,
          runs: list[Counter] | None = None) -> list[str]:
    """Shares of ``counts``; with ``runs`` (one Counter per recording) also the per-run
    spread, min-max."""
    head = "| share | per run (min-max) | what |" if runs else "| share | what |"
    lines = [f"**{title}** ({total} samples)", "", head,
             "|---|---|---|" if runs else "|---|---|"]  # fmt: skip
    for what, n in counts.most_common(top):
        if runs:
            shares = [100 * r[what] / max(1, sum(r.values())) for r in runs]
            lines.append(f"| {100 * n / total:.1f}% | {min(shares):.0f}-{max(shares):.0f}% "
                         f"| {what} |")  # fmt: skip
        else:
            lines.append(f"| {100 * n / total:.1f}% | {what} |")
    return [*lines, ""]


def role_tables(directory: Path, role_glob: str) -> list[str]:
    by_bucket: Counter = Counter()
    by_thread: Counter = Counter()
    thread_bucket: dict[str, Counter] = defaultdict(Counter)
    py: Counter = Counter()
    py_total = 0
    total = 0
    bucket_runs: list[Counter] = []
    thread_runs: list[Counter] = []
    for data in sorted(directory.glob(f"{role_glob}.perf.data")):
        stacks = pyspy_stacks(Path(str(data).replace(".perf.data", ".pyspy.txt")))
        names = thread_names(stacks)
        samples = perf_samples(data)
        main = min((tid for tid, _, _ in samples), default=None)  # the pid: the first thread
        # without py-spy's names: threads that ever ran the interpreter are to_thread workers
        python = {tid for tid, dso, _ in samples if "libpython" in dso or "_hashlib" in dso}
        bucket_runs.append(Counter())
        thread_runs.append(Counter())
        for tid, dso, sym in samples:
            guess = "asyncio_N (to_thread workers)" if tid in python else "libtorrent native thread"
            name = names.get(tid, guess)
            if name == "asyncio_N":
                name = guess
            if name.isdigit():
                name = "libtorrent native thread"
            if tid == main:
                name = "MainThread (event loop)"
            b = bucket(dso, sym)
            by_bucket[b] += 1
            by_thread[name] += 1
            bucket_runs[-1][b] += 1
            thread_runs[-1][name] += 1
            thread_bucket[name][b] += 1
            total += 1
        for tid, name, frames, n in stacks:
            what = python_function(frames)
            if what is not None:
                name = names.get(tid, name) if tid is not None else name
                thread = "libtorrent" if name.isdigit() else re.sub(r"_[0-9]+$", "_N", name)
                py[f"{thread}: {what}"] += n
                py_total += n
    if not total:
        return []
    out = table(f"{role_glob}: CPU by activity (perf, all threads)", by_bucket, total, 12,
                bucket_runs)  # fmt: skip
    out += table(f"{role_glob}: CPU by thread (perf)", by_thread, total, 12, thread_runs)
    for name, counts in sorted(thread_bucket.items(), key=lambda kv: -sum(kv[1].values())):
        n = sum(counts.values())
        if n / total >= 0.05:
            out += table(f"{role_glob}: {name} ({100 * n / total:.0f}% of the role)", counts, n,
                         6)  # fmt: skip
    if py_total:
        out += table(f"{role_glob}: Python threads by function (py-spy, active samples)", py,
                     py_total, 15)  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--roles", nargs="+", default=["*-agent", "*-seeder"],
                        help="globs of recording names (without .perf.data)")
    parser.add_argument("--md", type=Path, help="also write the tables here")
    args = parser.parse_args()
    lines: list[str] = []
    for role in args.roles:
        lines += role_tables(args.dir, role)
    text = "\n".join(lines)
    print(text)
    if args.md:
        args.md.write_text(text + "\n")


if __name__ == "__main__":
    main()
