"""The fault table of issue 20: runs ``tests/e2e/test_faults.py`` (real registry, tracker,
seeder and agents on loopback, faults injected by a relay or by killing and damaging parts)
and prints the markdown table it collects.

    python -m bench.faults [--out bench/results/faults.md] [pytest args...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also keep the table in this file")
    args, pytest_args = parser.parse_known_args()
    with tempfile.TemporaryDirectory(prefix="faults-") as tmp:
        table = Path(tmp) / "faults.md"
        env = {**os.environ, "FAULT_TABLE": str(table),
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             str(ROOT / "tests/e2e/test_faults.py"), *pytest_args],
            cwd=ROOT, env=env, check=False,
        )  # fmt: skip
        if not table.exists():
            print("no table: the fault tests did not run", file=sys.stderr)
            return run.returncode or 1
        text = table.read_text()
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
