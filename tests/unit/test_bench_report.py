"""The benchmark's markdown report: one row per run, CPU-bound runs named as such."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import pytest

from bench.distribute import (
    CPU_BOUND,
    MiB,
    RunResult,
    _earlier_report,
    _write_all,
    links,
    median_run,
    write_markdown,
)


def run(mode: str, nodes: int, cpu_busy: float, ok: bool = True, done: float = 0.0) -> RunResult:
    return RunResult(mode=mode, nodes=nodes, image_bytes=16 * MiB, rate_mbit=20.0, ok=ok,
                     all_done_s=done or 8.0 + nodes, p50_s=8.0, p99_s=8.5,
                     origin_egress_bytes=16 * MiB, lower_bound_s=6.7, setup_s=1.0,
                     cpu_busy=cpu_busy, error="" if ok else "1/4 failed")  # fmt: skip


def rows(path: Path) -> dict[tuple[str, str], str]:
    """(mode, N) -> status cell of every table row."""
    cells = [line.split("|")[1:-1] for line in path.read_text().splitlines()
             if line.startswith("| ") and not line.startswith("| mode")]  # fmt: skip
    return {(c[0].strip(), c[1].strip()): c[-1].strip() for c in cells}


def test_runs_with_the_cpu_saturated_are_marked_cpu_bound(tmp_path: Path) -> None:
    runs = [run("direct", 4, 0.05), run("p2p", 8, CPU_BOUND - 0.01), run("p2p", 16, CPU_BOUND),
            run("cache", 16, 0.97, ok=False)]  # fmt: skip
    report = tmp_path / "distribute.md"
    write_markdown(report, runs, "python bench/distribute.py", {"date": "today"})
    assert rows(report) == {
        ("direct", "4"): "ok",
        ("p2p", "8"): "ok",
        ("p2p", "16"): "ok, CPU-bound",
        ("cache", "16"): "FAILED: 1/4 failed",
    }
    assert "*CPU-bound*" in report.read_text()


def test_a_repeated_row_is_its_median_run_with_the_range(tmp_path: Path) -> None:
    tries = [run("p2p", 8, 0.5, done=t) for t in (9.8, 9.2, 9.5)]
    row = median_run(tries)
    assert row.all_done_s == 9.5 and row.all_done_runs == [9.8, 9.2, 9.5]
    report = tmp_path / "distribute.md"
    write_markdown(report, [row], "python bench/distribute.py --repeat 3", {})
    assert "| p2p | 8 | 9.50 (9.20-9.80) |" in report.read_text()


def test_a_failed_try_is_never_hidden_by_the_median() -> None:
    tries = [run("p2p", 8, 0.5, done=9.2), run("p2p", 8, 0.5, ok=False, done=30.0),
             run("p2p", 8, 0.5, done=9.3)]  # fmt: skip
    assert not median_run(tries).ok


def test_merge_replaces_the_rows_measured_again_and_keeps_the_others(tmp_path: Path) -> None:
    """``--merge``: a p2p-only run after a full one; the report has every mode, the new p2p
    rows, both commands; a report from other links is refused, not mixed in."""
    full = [run("direct", 8, 0.1, done=56.0), run("p2p", 8, 0.7, done=9.4),
            run("p2p", 16, 0.9, done=13.5)]  # fmt: skip
    _write_all(tmp_path, full, "python bench/distribute.py", 20.0, 1500, time.monotonic())
    earlier = _earlier_report(tmp_path / "distribute.json", links(20.0, 1500))
    again = [run("p2p", 8, 0.7, done=9.0)]
    _write_all(tmp_path, again, "python bench/distribute.py --modes p2p --nodes 8 --merge",
               20.0, 1500, time.monotonic(), earlier)  # fmt: skip
    report = json.loads((tmp_path / "distribute.json").read_text())
    assert sorted((r["mode"], r["nodes"], r["all_done_s"]) for r in report["runs"]) == [
        ("direct", 8, 56.0), ("p2p", 8, 9.0), ("p2p", 16, 13.5)]  # fmt: skip
    text = (tmp_path / "distribute.md").read_text()
    assert "python bench/distribute.py\npython bench/distribute.py --modes p2p" in text
    assert "| p2p | 8 | 9.00 |" in text and "9.40" not in text
    assert (tmp_path / "distribute.png").stat().st_size > 0
    with pytest.raises(click.UsageError, match="other links"):
        _earlier_report(tmp_path / "distribute.json", links(50.0, 1500))
    assert _earlier_report(tmp_path / "none.json", links(20.0, 1500)) == {"runs": []}
