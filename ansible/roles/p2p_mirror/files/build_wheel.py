#!/usr/bin/env python3
"""Build a reproducible p2p-mirror wheel from a checkout (runs on the ansible controller).

Why a copy: pip builds local projects in-tree, leaving build/ behind, whose stale files can end
up in the next wheel. Why SOURCE_DATE_EPOCH: equal sources give byte-equal wheels, so the
playbook reinstalls on a host only when the code really changed.

Usage: build_wheel.py SOURCE_DIR OUT_DIR; prints the wheel's path as the last line.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SKIP = shutil.ignore_patterns(
    ".git", "build", "dist", "*.egg-info", "__pycache__", ".venv", ".pytest_cache",
    ".ruff_cache", "tests", "bench", "ansible", "deploy",
)
EPOCH = "315532800"  # 1980-01-01, the oldest date a zip entry can carry


def build(source: Path, out_dir: Path) -> Path:
    """Copy ``source`` aside, build its wheel there, move it into ``out_dir``."""
    if not (source / "pyproject.toml").is_file():
        raise SystemExit(f"{source}: no pyproject.toml, not a p2p-mirror checkout")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="p2p-mirror-wheel-") as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(source, src, ignore=SKIP)
        built = Path(tmp) / "out"
        env = dict(os.environ, SOURCE_DATE_EPOCH=EPOCH, PIP_DISABLE_PIP_VERSION_CHECK="1")
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
             "--wheel-dir", str(built), str(src)],
            check=True, env=env, stdin=subprocess.DEVNULL, stdout=sys.stderr,
        )
        (wheel,) = built.glob("p2p_mirror-*.whl")
        target = out_dir / wheel.name
        shutil.move(wheel, target)
    return target


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    print(build(Path(argv[1]).resolve(), Path(argv[2]).resolve()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
