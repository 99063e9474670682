"""Restart commands for the installer tests: fail, fail once, or stop the runtime for good.

``installer_restart.py fail``                      exit 3 (a broken restart)
``installer_restart.py ok``                        exit 0 (a restart that works)
(any action, ``--log F``: append the unit name to F, to count the restarts)
``installer_restart.py fail-once --marker F -- CMD``  fail the first call, then run CMD
``installer_restart.py stop --pidfile F``          kill the PID in F, start nothing
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _stop(pidfile: Path) -> None:
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        if "\nState:\tZ" in status:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("action", choices=["fail", "ok", "fail-once", "stop"])
    parser.add_argument("--marker", type=Path)
    parser.add_argument("--pidfile", type=Path)
    parser.add_argument("--log", type=Path)
    parser.add_argument("unit", nargs="?", default="")
    command: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, command = argv[:at], argv[at + 1 :]
    args = parser.parse_args(argv)
    if args.log is not None:
        with args.log.open("a") as f:
            f.write(f"{args.unit}\n")
    if args.action == "ok":
        return 0
    if args.action == "fail":
        print("simulated restart failure", file=sys.stderr)
        return 3
    if args.action == "fail-once":
        if not args.marker.exists():
            args.marker.write_text("failed once\n")
            print("simulated restart failure (first call)", file=sys.stderr)
            return 3
        return subprocess.run(command).returncode
    _stop(args.pidfile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
