"""The p2p-mirror roles as real processes on loopback: tracker, seeder, any number of agents.

Used by the end-to-end tests and the local demo; the multi-node ``Cluster`` does the same
inside network namespaces.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from lab.cluster import p2p_mirror_argv, parse_blob_sources
from lab.procs import Proc, ProcGroup, free_port, port_open
from p2p_mirror.core.metrics import sample_sum


def metric_sum(text: str, name: str, **labels: str) -> float:
    """Sum of the series of ``p2p_mirror_<name>`` in Prometheus ``text`` that carry ``labels``
    (all series by default)."""
    return sample_sum(text, f"p2p_mirror_{name}", **labels)


@dataclass
class AgentProc:
    name: str
    port: int
    data_dir: Path
    proc: Proc
    proxy_port: int = 0  # its dockerd proxy (proxy_listen), 0: off

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as resp:
            return resp.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        return metric_sum(self.metrics_text(), name, **labels)

    def blob_sources(self) -> dict[str, int]:
        return parse_blob_sources(self.metrics_text())


class LocalStack:
    """Start roles on free loopback ports; ``close()`` stops them all by PID."""

    def __init__(self, workdir: Path, registries: dict[str, str | dict],
                 segment_size: str = "64MiB", seeder_args: Sequence[str] = ()) -> None:
        """``registries``: name -> URL, or the config mapping (``{url:, ca_file:, ...}``);
        ``seeder_args`` go after the seeder's defaults (a flag given again wins)."""
        self.workdir = workdir
        self.seeder_args = list(seeder_args)
        self.registries = registries
        self.segment_size = segment_size
        self.procs = ProcGroup()
        self.tracker_port = 0
        self.seeder_port = 0
        self.tracker: Proc | None = None
        self.seeder: Proc | None = None
        self.agents: list[AgentProc] = []

    def _registry_args(self) -> list[str]:
        if any(isinstance(u, dict) for u in self.registries.values()):
            path = self.workdir / "seeder-registries.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump({"registries": dict(self.registries)}))
            return ["--config", str(path)]
        return [arg for n, u in self.registries.items() for arg in ("--registry", f"{n}={u}")]

    @property
    def seeder_url(self) -> str:
        return f"http://127.0.0.1:{self.seeder_port}"

    def start(self) -> LocalStack:
        self.tracker_port = free_port()
        self.tracker = tracker = self.procs.start(
            [*p2p_mirror_argv(), "tracker", "--listen", f"127.0.0.1:{self.tracker_port}",
             "--interval", "5"],
            self.workdir / "tracker.log",
        )
        tracker.wait_ready(lambda: port_open("127.0.0.1", self.tracker_port), 30, "tracker")
        self.start_seeder()
        return self

    def start_seeder(self) -> Proc:
        self.seeder_port = self.seeder_port or free_port()
        self.seeder = self.procs.start(
            [
                *p2p_mirror_argv(), "seeder",
                "--listen", f"127.0.0.1:{self.seeder_port}",
                "--data-dir", str(self.workdir / "seeder"),
                "--tracker", f"http://127.0.0.1:{self.tracker_port}/announce",
                "--bt-listen", "127.0.0.1:0",
                "--segment-size", self.segment_size,
                *self._registry_args(),
                *self.seeder_args,
            ],
            self.workdir / "seeder.log",
        )  # fmt: skip
        self.seeder.wait_ready(lambda: port_open("127.0.0.1", self.seeder_port), 30, "seeder")
        return self.seeder

    def stop_seeder(self) -> None:
        if self.seeder is not None:
            self.seeder.stop()

    def add_agent(self, name: str, **config: object) -> AgentProc:
        """An agent with its own port and cache; ``config`` keys go to its YAML config file."""
        port = free_port()
        proxy_port = free_port()  # never the default 5003: agents here share one loopback
        data_dir = self.workdir / name
        cfg = {
            "listen": f"127.0.0.1:{port}",
            "proxy_listen": f"127.0.0.1:{proxy_port}",
            "data_dir": str(data_dir),
            "seeder": [self.seeder_url],
            "bt_listen": "127.0.0.1:0",
            "registries": dict(self.registries),
            **config,
        }
        cfg_path = self.workdir / f"{name}.yaml"
        cfg_path.parent.mkdir(parents=True, exist_ok=True)
        cfg_path.write_text(yaml.safe_dump(cfg))
        proc = self.procs.start(
            [*p2p_mirror_argv(), "agent", "--config", str(cfg_path)], self.workdir / f"{name}.log"
        )
        proc.wait_ready(lambda: port_open("127.0.0.1", port), 30, f"agent {name}")
        agent = AgentProc(name, port, data_dir, proc,
                          proxy_port if cfg["proxy_listen"] else 0)
        self.agents.append(agent)
        return agent

    def close(self) -> None:
        self.procs.close()

    def dump_logs(self, lines: int = 40) -> None:
        """Print every role's log tail (pytest shows it for a failed test)."""
        for proc in self.procs.procs:
            print(f"----- {proc.log.name} -----\n{proc.tail(lines)}")

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
