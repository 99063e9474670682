"""Helpers shared by the test tiers: the checkout's root, required parts, failure state."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SUPPORT = Path(__file__).resolve().parent


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def require_binaries(*names: str) -> None:
    """Skip (outside CI) or fail (in CI) when a real part this test needs is not installed."""
    missing = [n for n in names if shutil.which(n) is None]
    if not missing:
        return
    reason = f"not installed: {', '.join(missing)} (see .ci install step)"
    if in_ci():
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


def require_root() -> None:
    if os.geteuid() == 0:
        return
    if in_ci():
        pytest.fail("CI=true but not root (containerd and mounts need root)", pytrace=False)
    pytest.skip("needs root")


def failed(request: pytest.FixtureRequest) -> bool:
    report = getattr(request.node, "rep_call", None)
    return report is None or report.failed


def snapshot(root: Path, skip: str | None = None) -> dict[str, tuple[str, bytes | None, int]]:
    """Every file, dir and symlink under root: kind, bytes (a link's target), mode. Equal
    snapshots = identical trees. ``skip``: a relative dir left out, with its parents."""
    out: dict[str, tuple[str, bytes | None, int]] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if skip and (rel == skip or rel.startswith(skip + "/") or skip.startswith(rel + "/")):
            continue
        if p.is_symlink():
            out[rel] = ("link", str(p.readlink()).encode(), 0)
            continue
        mode = p.stat().st_mode & 0o7777
        out[rel] = ("dir", None, mode) if p.is_dir() else ("file", p.read_bytes(), mode)
    return out


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait (on the event loop) until ``check()`` holds; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)
