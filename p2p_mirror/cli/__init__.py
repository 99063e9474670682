"""The ``p2p-mirror`` command: one click group, one subcommand per role."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from p2p_mirror import __version__
from p2p_mirror.cli.common import (
    cache_option,
    cluster_secret_option,
    config_option,
    data_dir_option,
    load_or_exit,
    log_level_option,
    registry_option,
    setup_logging,
    upload_option,
)
from p2p_mirror.core.config import AgentConfig, SeederConfig


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="p2p-mirror")
def main() -> None:
    """P2P container image distribution: registry mirror agent, seeder, tracker, installer."""


@main.command()
@config_option
@click.option("--listen", metavar="HOST:PORT", help="Mirror address [127.0.0.1:5004].")
@data_dir_option("Blob cache")
@click.option("--seeder", "seeder", multiple=True, metavar="URL", help="Seeder URL (repeatable).")
@click.option("--bt-listen", metavar="HOST:PORT", help="BitTorrent address [0.0.0.0:6881].")
@registry_option
@click.option("--default-registry", metavar="NAME", help="Upstream when the client names none.")
@cache_option
@click.option("--download-rate-limit", metavar="RATE", help="Swarm download bytes/s (0: none).")
@upload_option
@click.option("--announce-ip", metavar="ADDR",
              help="Node address announced to trackers (Kubernetes: status.hostIP).")
@click.option("--proxy-listen", metavar="HOST:PORT",
              help="HTTPS proxy for dockerd [127.0.0.1:5003]; empty: off.")
@click.option("--metrics-listen", metavar="HOST:PORT",
              help="Extra /metrics and /healthz address for Prometheus [off].")
@cluster_secret_option
@log_level_option
def agent(config: Path | None, **flags: Any) -> None:
    """Run the node agent: an OCI pull-only registry mirror fed by the BitTorrent swarm.

    Point containerd at it with hosts.toml (see `p2p-mirror install`). The upstream registry
    comes from containerd's ?ns= parameter, a /v2/<registry>/<repo> path prefix (skopeo,
    podman), or --default-registry; only registries configured with --registry are served
    (others get 404, so the runtime uses its fallback host). If the seeder, tracker or swarm
    fail, blobs come from the origin registry directly.
    """
    from p2p_mirror.agent.server import run_agent

    cfg = load_or_exit(AgentConfig, config, flags)
    _check_secret_files(cfg.cluster_secret, None)
    setup_logging(cfg.log_level)
    run_agent(cfg)


@main.command()
@config_option
@click.option("--listen", metavar="HOST:PORT", help="Metainfo API address [0.0.0.0:5005].")
@data_dir_option("Blob store")
@click.option("--tracker", "tracker", multiple=True, metavar="URL", help="Tracker announce URL.")
@click.option("--bt-listen", metavar="HOST:PORT", help="BitTorrent address [0.0.0.0:6882].")
@registry_option
@click.option("--segment-size", metavar="SIZE", help="Largest segment per torrent [16MiB].")
@click.option("--segment-parts", metavar="N", help="Segments per blob, at least [8].")
@click.option("--registry-auth", type=click.Path(path_type=Path), metavar="FILE",
              help="Docker config.json with the seeder's own registry credentials.")
@click.option("--announce-ip", metavar="ADDR", help="Address agents reach this seeder's swarm on.")
@cache_option
@upload_option
@cluster_secret_option
@log_level_option
def seeder(config: Path | None, **flags: Any) -> None:
    """Run a seeder: pulls each blob from the origin once, makes its torrents, seeds them."""
    from p2p_mirror.seeder.server import run_seeder

    cfg = load_or_exit(SeederConfig, config, flags)
    _check_secret_files(cfg.cluster_secret, cfg.registry_auth)
    setup_logging(cfg.log_level)
    run_seeder(cfg)


def _check_secret_files(cluster_secret: Path | None, registry_auth: Path | None) -> None:
    """A bad cluster secret or credentials file stops the role at once, with a message that
    names the file and never its content."""
    from p2p_mirror.core.clusterauth import ClusterSecretError, load_secret
    from p2p_mirror.seeder.credentials import CredentialsError, load_docker_config

    try:
        if cluster_secret is not None:
            load_secret(cluster_secret)
        if registry_auth is not None:
            load_docker_config(registry_auth)
    except (ClusterSecretError, CredentialsError) as e:
        raise click.UsageError(str(e)) from None


@main.command()
@click.option("--agent", "url", default="http://127.0.0.1:5004", show_default=True,
              help="The agent (or seeder/tracker) base URL.")
@click.option("--timeout", default=5.0, show_default=True, help="Seconds to wait for answers.")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=Path("/"),
              show_default=True, help="Host root whose installer state is checked.")
def status(url: str, timeout: float, root: Path) -> None:
    """Show whether a role is healthy and what its counters say, and whether the node's
    install failed; exit 1 if either is not well."""
    from p2p_mirror.installer.failure import status_line
    from p2p_mirror.status import fetch_status

    install_problem = status_line(root)
    if install_problem is not None:
        click.echo(install_problem, err=True)
    try:
        lines = fetch_status(url.rstrip("/"), timeout)
    except OSError as e:
        click.echo(f"{url}: unreachable ({e})", err=True)
        sys.exit(1)
    for line in lines:
        click.echo(line)
    if install_problem is not None:
        sys.exit(1)


def _register_commands() -> None:
    """Subcommands defined in this package's sibling modules (they import only ``common``)."""
    from p2p_mirror.cli.install import install, uninstall
    from p2p_mirror.cli.tracker import tracker

    for command in (tracker, install, uninstall):
        main.add_command(command)


_register_commands()
