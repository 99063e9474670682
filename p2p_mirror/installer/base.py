"""What every runtime adapter (containerd, dockerd) offers the install engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class InstallError(RuntimeError):
    """The installer refuses to go on; nothing was changed (or everything was restored)."""


@dataclass
class Change:
    """A file to write: its host path (``/etc/...``) and the bytes it should hold.

    ``restart``: the runtime reads the file only at start (containerd re-reads hosts.toml on
    every pull, so those changes need no restart).
    """

    path: str
    new: bytes
    mode: int | None = None  # None: the file's current mode, 0644 for a new file
    owner: tuple[int, int] | None = None  # None: the file's current owner, the installer's
    secret: bool = False  # never print its bytes (--dry-run shows only that it changes)
    restart: bool = True


@dataclass
class Plan:
    changes: list[Change] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Runtime(Protocol):
    """A container runtime the installer can point at the mirror."""

    name: str  # "containerd" or "dockerd"
    unit: str  # systemd unit to restart

    def plan(self) -> Plan:
        """The files to write, computed from what is on disk now (read-only)."""
        ...

    def baseline(self) -> None:
        """Note what is healthy now, before the restart, to compare against afterwards."""
        ...

    def health(self) -> str | None:
        """None if the runtime answers and loaded its config, else a short reason."""
        ...

    # Optional, looked up with getattr by the engine (containerd has neither):
    #   reload_systemd: bool  -- run `systemctl daemon-reload` before `systemctl restart`
    #   restart_refusal() -> str | None  -- why restarting it now would be unsafe
