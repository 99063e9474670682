"""Processes the lab starts: logged to a file, waited for, and stopped by PID, always."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil


class LabError(RuntimeError):
    """A lab process did not start or a readiness check timed out."""


def lab_python() -> list[str]:
    """``python -m`` for the lab's own helper processes: the lab is a checkout, not installed."""
    return ["env", f"PYTHONPATH={Path(__file__).resolve().parent.parent}", sys.executable, "-m"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host`` (racy, good enough for tests)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll ``check`` until it returns true; raise ``LabError`` naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - a failing probe just means "not yet"
            pass
        if time.monotonic() > deadline:
            raise LabError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def netns_prefix(netns: str | None) -> list[str]:
    """Run in a named network namespace without remounting /sys (runc needs its cgroups)."""
    return ["nsenter", f"--net=/run/netns/{netns}"] if netns else []


class Proc:
    """One started process: its log file, its PID, and a stop that always happens."""

    def __init__(
        self,
        argv: Sequence[str],
        log: Path,
        netns: str | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.argv = [*netns_prefix(netns), *map(str, argv)]
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._logf = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            self.argv,
            stdout=self._logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_ready(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        """Wait for ``check``; fail fast with the log tail if the process died meanwhile."""

        def ready() -> bool:
            if not self.alive():
                raise LabError(f"{what} exited with {self.popen.returncode}:\n{self.tail()}")
            return check()

        try:
            wait_for(ready, timeout, what)
        except LabError:
            raise
        except Exception as e:  # pragma: no cover - defensive
            raise LabError(f"{what}: {e}") from e

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the process group, then SIGKILL; returns the exit code."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait(timeout)
        self._logf.close()
        return self.popen.returncode


class ProcGroup:
    """Everything a test or demo started; ``close()`` stops it all in reverse order."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []

    def start(self, argv: Sequence[str], log: Path, **kw: object) -> Proc:
        proc = Proc(argv, log, **kw)  # type: ignore[arg-type]
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        while self.procs:
            with contextlib.suppress(Exception):
                self.procs.pop().stop()

    def __enter__(self) -> ProcGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CpuTime:
    """CPU seconds (user + system) that named processes used since construction."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.start = {name: self._cpu(p) for name, p in self.procs.items()}

    @staticmethod
    def _cpu(proc: psutil.Process) -> float:
        times = proc.cpu_times()
        return times.user + times.system

    def used(self) -> dict[str, float]:
        """Seconds each process used so far (NaN for one that has exited: a failed run)."""
        out = {}
        for name, proc in self.procs.items():
            try:
                out[name] = self._cpu(proc) - self.start[name]
            except psutil.NoSuchProcess:
                out[name] = float("nan")
        return out
