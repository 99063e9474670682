"""`python -m lab.demo`: a small cluster on this machine pulls one image at once, through P2P.

Every node is a network namespace with a shaped link, its own containerd and its own agent;
the origin is a real registry in its own namespace. The image is generated, pushed, and
pulled by every node at the same instant under its original name. The table at the end says
where the bytes came from. Everything is torn down on exit, Ctrl-C or failure.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import click

from lab.cluster import Cluster, NodeResult, Progress, install_hosts, progress_cells
from lab.images import build_image
from lab.netns import cleanup_stale, exit_on_signals
from p2p_mirror.status import human_bytes

REPO, TAG = "demo/app", "v1"
TOOLS = ("ip", "tc", "nsenter", "containerd", "ctr", "docker-registry", "skopeo", "curl")


def check_machine() -> None:
    """Fail early, with what is missing, instead of half-way through the setup."""
    if os.geteuid() != 0:
        raise click.UsageError("the demo needs root (network namespaces, tc, containerd)")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        raise click.UsageError(
            f"missing tools: {', '.join(missing)} (run scripts/install-deps.sh first)"
        )


def progress_printer(echo: Callable[[str], None]) -> Callable[[list[Progress]], None]:
    """A header, then one line per second: each node's share of the image received so far."""
    last = [-1.0]

    def show(samples: list[Progress]) -> None:
        now = max(s.seconds for s in samples)
        if now - last[0] < 1.0:
            return
        if last[0] < 0:
            echo("    time" + "".join(f"{s.node:>7}" for s in samples))
        last[0] = now
        echo(f"  {now:5.1f}s" + "".join(f"{c:>7}" for c in progress_cells(samples).split()))

    return show


def report(results: list[NodeResult], image_bytes: int, origin_bytes: int) -> list[str]:
    lines = [
        "",
        f"{'node':<8} {'ok':<4} {'time':>7} {'from peers':>12} {'from origin':>12} {'link rx':>10}",
    ]
    for r in results:
        lines.append(
            f"{r.node:<8} {'yes' if r.ok else 'NO':<4} {r.seconds:6.1f}s "
            f"{human_bytes(r.sources.get('swarm', 0)):>12} "
            f"{human_bytes(r.sources.get('origin', 0)):>12} {human_bytes(r.rx_bytes):>10}"
        )
    all_done = max(r.seconds for r in results)
    lines += [
        "",
        f"image size            {human_bytes(image_bytes)}",
        f"origin served         {human_bytes(origin_bytes)} "
        f"({origin_bytes / image_bytes:.2f} x the image, for {len(results)} nodes)",
        f"all nodes done after  {all_done:.1f}s",
    ]
    for r in results:
        if not r.ok:
            lines.append(f"{r.node} failed: {r.error}")
    return lines


def run_demo(nodes: int, layer_sizes: list[int], rate_mbit: float, workdir: Path | None,
             echo: Callable[[str], None] = click.echo, seeders: int = 1,
             trackers: int = 1) -> bool:  # fmt: skip
    """Build, push, pull everywhere at once, report. True if every node got the image."""
    check_machine()
    exit_on_signals()
    cleanup_stale()
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="p2p-mirror-demo-")
        workdir = Path(tmp.name)
    try:
        echo(f"building a {len(layer_sizes)}-layer image "
             f"({human_bytes(sum(layer_sizes))}) ...")  # fmt: skip
        layout = build_image(workdir / "image", layer_sizes, seed=2026)
        echo(f"starting {nodes} nodes ({rate_mbit:g} Mbit/s links), an origin registry, "
             f"{trackers} tracker(s) and {seeders} seeder(s), each in its own network "
             "namespace ...")  # fmt: skip
        with Cluster(workdir / "cluster", nodes, mode="p2p", rate_mbit=rate_mbit,
                     log=lambda m: echo(f"  {m}"), write_hosts=install_hosts,
                     seeders=seeders, trackers=trackers) as cluster:  # fmt: skip
            ref = cluster.push(layout, REPO, TAG)
            echo(f"pushed {ref} to the origin; every node now runs `ctr image pull {ref}`")
            mark = cluster.origin_mark()
            started = time.monotonic()
            results = cluster.pull_all(ref, expected_digest=layout.manifest_digest,
                                       expected_bytes=layout.total_size,
                                       progress=progress_printer(echo))  # fmt: skip
            origin = cluster.origin_egress(mark)
            echo(f"pulls finished in {time.monotonic() - started:.1f}s")
            for line in report(results, layout.total_size, origin):
                echo(line)
            return all(r.ok for r in results)
    finally:
        if tmp is not None:
            tmp.cleanup()


@click.command()
@click.option("--nodes", default=4, show_default=True, type=click.IntRange(1, 16),
              help="Nodes pulling at once.")
@click.option("--layers", default="48MiB,32MiB,16MiB,8MiB", show_default=True,
              help="Layer sizes of the generated image.")
@click.option("--rate-mbit", default=100.0, show_default=True,
              help="Every node's link, both ways (tc tbf).")
@click.option("--workdir", type=click.Path(path_type=Path),
              help="Keep images, logs and caches here (default: a temp dir, removed).")
@click.option("--seeders", default=1, show_default=True, type=click.IntRange(1, 8),
              help="Seeders (each blob is fetched by its owner).")
@click.option("--trackers", default=1, show_default=True, type=click.IntRange(1, 8),
              help="Trackers (each torrent announces to 2).")
def demo(nodes: int, layers: str, rate_mbit: float, workdir: Path | None, seeders: int,
         trackers: int) -> None:
    """A cluster on this machine pulls one image at once through p2p-mirror (needs root).

    Nodes are network namespaces with shaped links; each runs containerd and the agent,
    configured by `p2p-mirror install`. Traffic stays in namespaces the demo creates; all of
    it is torn down at the end, on Ctrl-C and on failure.
    """
    from p2p_mirror.core.config import parse_size

    try:
        sizes = [parse_size(s) for s in layers.split(",") if s.strip()]
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--layers") from None
    if not sizes:
        raise click.BadParameter("give at least one layer size", param_hint="--layers")
    sys.exit(0 if run_demo(nodes, sizes, rate_mbit, workdir, seeders=seeders,
                           trackers=trackers) else 1)


if __name__ == "__main__":
    demo(prog_name="python -m lab.demo")
