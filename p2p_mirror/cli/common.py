"""Helpers every ``p2p-mirror`` subcommand shares: logging, config loading, options."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click

from p2p_mirror.core.config import ConfigError, load_config


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def load_or_exit(cls: type, config: Path | None, overrides: dict[str, Any]) -> Any:
    """Load a role's config; a bad value ends the process with a message naming the key."""
    try:
        return load_config(cls, config, overrides)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None


config_option = click.option(
    "--config", type=click.Path(path_type=Path), help="YAML config file; flags override it."
)
registry_option = click.option(
    "--registry",
    "registries",
    multiple=True,
    metavar="NAME=URL",
    help="Serve registry NAME from endpoint URL (repeatable): the allowlist; other names are "
    "not served.",
)


cache_option = click.option(
    "--cache-max-bytes", metavar="SIZE", help="LRU cache cap, e.g. 20GiB (0: none)."
)
upload_option = click.option(
    "--upload-rate-limit", metavar="RATE", help="Swarm upload bytes/s (0: none)."
)
log_level_option = click.option(
    "--log-level", metavar="LEVEL", help="debug, info, warning, error [info]."
)


def data_dir_option(what: str) -> Any:
    return click.option("--data-dir", type=click.Path(path_type=Path), help=f"{what} directory.")


cluster_secret_option = click.option(
    "--cluster-secret", type=click.Path(path_type=Path), metavar="FILE",
    help="File with the cluster secret shared by agents, seeders and trackers "
    "(without it the role runs open: a one-machine lab only).",
)
