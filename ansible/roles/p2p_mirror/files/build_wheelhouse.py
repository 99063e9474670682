#!/usr/bin/env python3
"""Build the offline wheelhouse for one target (runs on the ansible controller).

A wheelhouse holds the p2p-mirror wheel, the wheel of every dependency at the versions the
constraints file pins (for the target's Python and machine, from the controller's package
index), and that constraints file. Hosts install from it with ``pip --no-index``, so they need
no package index. The p2p-mirror wheel is built reproducibly from a checkout (a copy, with
SOURCE_DATE_EPOCH: equal sources give equal bytes) or downloaded as a pinned requirement.
The wheelhouse's directory is named by a hash of its contents: same inputs, same directory,
so a host's copy changes, and the package is reinstalled, only when something really changed.
A wheelhouse already built from the same inputs (sources, constraints, target) is reused.

The wheelhouse also comes as DIR.tar (deterministic), which is what a host is sent: one file
to compare and copy instead of a checksum round trip per wheel.

Usage: build_wheelhouse.py --out DIR --constraints FILE --target PY_VERSION MACHINE
                           (--source CHECKOUT | --package REQUIREMENT)
Prints the wheelhouse's path as the last line.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SKIP = shutil.ignore_patterns(
    ".git", "build", "dist", "*.egg-info", "__pycache__", ".venv", ".pytest_cache",
    ".ruff_cache", "tests", "bench", "ansible", "deploy", "lab",
)
EPOCH = "315532800"  # 1980-01-01, the oldest date a zip entry can carry
# manylinux tags a glibc 2.28+ host accepts (Debian 12, Ubuntu 22.04/24.04 have 2.35+).
GLIBC_TAGS = ("manylinux_2_28", "manylinux_2_27", "manylinux_2_24", "manylinux_2_17",
              "manylinux2014", "manylinux_2_12", "manylinux2010", "manylinux_2_5", "manylinux1")


def pip(args: list[str], env: dict[str, str]) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, env=env,
                   stdin=subprocess.DEVNULL, stdout=sys.stderr)


def own_wheel(args: argparse.Namespace, tmp: Path, env: dict[str, str]) -> Path:
    """The p2p-mirror wheel: built from the checkout, or downloaded (pure Python either way)."""
    out = tmp / "own"
    if args.source:
        source = Path(args.source).resolve()
        if not (source / "pyproject.toml").is_file():
            raise SystemExit(f"{source}: no pyproject.toml, not a p2p-mirror checkout")
        src = tmp / "src"
        shutil.copytree(source, src, ignore=SKIP)
        # The controller's own setuptools when it has one: an isolated build installs it anew
        # each time (seconds, and the index).
        isolation = [] if importlib.util.find_spec("setuptools") is None else [
            "--no-build-isolation"]
        pip(["wheel", "--quiet", "--no-deps", *isolation, "--wheel-dir", str(out), str(src)],
            dict(env, SOURCE_DATE_EPOCH=EPOCH))
    else:
        pip(["download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest", str(out),
             args.package], env)
    (wheel,) = out.glob("p2p_mirror-*.whl")
    return wheel


def inputs_digest(args: argparse.Namespace, constraints: Path) -> str:
    """A hash of everything the wheelhouse is made from (this script included)."""
    digest = hashlib.sha256()
    for part in (Path(__file__).read_bytes(), constraints.read_bytes(),
                 " ".join(args.target).encode(), (args.package or "").encode()):
        digest.update(hashlib.sha256(part).digest())
    if args.source:
        source = Path(args.source).resolve()
        for path in sorted(source.rglob("*")):
            rel = path.relative_to(source)
            if path.is_file() and not any(SKIP("", [part]) for part in rel.parts):
                content = hashlib.sha256(path.read_bytes()).digest()
                digest.update(str(rel).encode() + b"\0" + content)
    return digest.hexdigest()[:24]


def build(args: argparse.Namespace) -> Path:
    version, machine = args.target
    major, minor = version.split(".")[:2]
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    constraints = Path(args.constraints).resolve()
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = out_dir / f".inputs-{inputs_digest(args, constraints)}"
    if marker.is_file() and (out_dir / marker.read_text().strip()).is_dir():
        return out_dir / marker.read_text().strip()
    with tempfile.TemporaryDirectory(prefix="p2p-mirror-wheelhouse-") as tmp_name:
        tmp = Path(tmp_name)
        wheel = own_wheel(args, tmp, env)
        house = tmp / "house"
        platforms = [arg for tag in GLIBC_TAGS for arg in ("--platform", f"{tag}_{machine}")]
        download = ["download", "--quiet", "--only-binary=:all:", "--dest", str(house),
                    "--python-version", f"{major}.{minor}", "--implementation", "cp",
                    "--abi", f"cp{major}{minor}", "--abi", "abi3", "--abi", "none", *platforms,
                    "--platform", "any", "--constraint", str(constraints), str(wheel)]
        # The dependencies depend only on the pins and the target: fetched once, then reused
        # without the index for every new p2p-mirror wheel.
        pins = hashlib.sha256(constraints.read_bytes()).hexdigest()[:16]
        deps = out_dir / f".deps-cp{major}{minor}-{machine}-{pins}"
        if deps.is_dir():
            pip([*download, "--no-index", "--find-links", str(deps)], env)
        else:
            pip(download, env)
            shutil.copytree(house, tmp / "deps", ignore=shutil.ignore_patterns("p2p_mirror-*"))
            shutil.move(str(tmp / "deps"), deps)
        shutil.copyfile(constraints, house / "constraints.txt")
        digest = hashlib.sha256()
        for path in sorted(house.iterdir()):
            digest.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
        target = out_dir / f"p2p-mirror-cp{major}{minor}-{machine}-{digest.hexdigest()[:16]}"
        if not target.exists():
            shutil.move(str(house), target)
    archive = target.with_name(target.name + ".tar")
    if not archive.exists():
        pack(target, archive)
    marker.write_text(target.name + "\n")
    return target


def pack(directory: Path, archive: Path) -> None:
    """``directory`` as a tar whose bytes depend only on the files' names and contents."""
    partial = archive.with_name(archive.name + ".partial")
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in [directory, *sorted(directory.iterdir())]:
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(directory.parent)))
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = int(EPOCH)
            info.mode = 0o755 if path.is_dir() else 0o644
            if path.is_dir():
                tar.addfile(info)
            else:
                with open(path, "rb") as f:
                    tar.addfile(info, f)
    partial.replace(archive)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--constraints", required=True)
    parser.add_argument("--target", nargs=2, required=True, metavar=("PY_VERSION", "MACHINE"))
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--source")
    what.add_argument("--package")
    print(build(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
