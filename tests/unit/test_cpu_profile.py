"""bench.cpu_profile's reading of py-spy's raw recordings."""

from __future__ import annotations

from pathlib import Path

from bench.cpu_profile import pyspy_stacks, thread_names


def test_a_thread_keeps_the_name_py_spy_gave_it_when_later_samples_omit_it(
    tmp_path: Path,
) -> None:
    raw = tmp_path / "run0-cold-agent.pyspy.txt"
    raw.write_text(
        "thread (8401): blob-hash;_work (serial_thread.py:40) 3\n"
        "thread (8401);_work (serial_thread.py:40) 2\n"
        "thread (8402): asyncio_3;_worker (thread.py:80) 1\n"
        "thread (8403);run (x.py:1) 1\n"
    )
    stacks = pyspy_stacks(raw)
    names = thread_names(stacks)
    tids = {name: tid for tid, name, _, _ in stacks}
    assert names[tids["blob-hash"]] == "blob-hash"
    assert names[tids["asyncio_3"]] == "asyncio_N"
    assert len(names) == 3  # the never-named thread keeps its bare id
