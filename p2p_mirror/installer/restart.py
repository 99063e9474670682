"""Restart a runtime (systemd or a user command) and wait until it answers on its socket."""

from __future__ import annotations

import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass


class RestartError(RuntimeError):
    """The restart command failed or the runtime did not become healthy in time."""


@dataclass
class Restarter:
    """``command`` is a template split with shlex; ``{unit}`` becomes containerd or docker.

    None means ``systemctl restart <unit>``. Never run through a shell.
    """

    command: str | None = None
    timeout: float = 60.0

    def argv(self, unit: str) -> list[str]:
        if self.command is None:
            return ["systemctl", "restart", unit]
        return [part.replace("{unit}", unit) for part in shlex.split(self.command)]

    def restart(self, unit: str) -> None:
        argv = self.argv(unit)
        try:
            proc = subprocess.run(
                argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=self.timeout
            )
        except FileNotFoundError:
            raise RestartError(f"restart command not found: {argv[0]}") from None
        except subprocess.TimeoutExpired:
            raise RestartError(f"restart command timed out after {self.timeout:.0f}s: "
                               f"{shlex.join(argv)}") from None
        if proc.returncode != 0:
            out = (proc.stderr or proc.stdout).decode(errors="replace").strip()[-500:]
            raise RestartError(
                f"restart command {shlex.join(argv)} exited with {proc.returncode}: {out}"
            )


def wait_healthy(check: Callable[[], str | None], timeout: float, what: str) -> None:
    """Poll ``check`` (returns None when healthy, else why not) until ``timeout``."""
    deadline = time.monotonic() + timeout
    why: str | None = "not checked"
    while True:
        why = check()
        if why is None:
            return
        if time.monotonic() > deadline:
            raise RestartError(f"{what} did not become healthy within {timeout:.0f}s: {why}")
        time.sleep(0.2)
