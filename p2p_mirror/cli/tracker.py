"""``p2p-mirror tracker``: run the BitTorrent HTTP tracker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from p2p_mirror.cli.common import (
    cluster_secret_option,
    config_option,
    load_or_exit,
    log_level_option,
    setup_logging,
)
from p2p_mirror.core.config import ConfigError, TrackerConfig


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@config_option
@click.option("--listen", metavar="HOST:PORT", help="Announce/scrape address [0.0.0.0:6969].")
@click.option(
    "--interval", metavar="SECONDS", help="Re-announce interval told to leechers [30]."
)
@click.option(
    "--peer-ttl",
    metavar="SECONDS",
    help="Forget a leecher not heard from for this long [0: 3 x interval].",
)
@click.option(
    "--seed-interval", metavar="SECONDS", help="Re-announce interval told to seeds [1800]."
)
@click.option(
    "--seed-peer-ttl",
    metavar="SECONDS",
    help="Forget a seed not heard from for this long [0: 3 x seed-interval].",
)
@click.option("--max-numwant", metavar="N", help="Most peers returned per announce [200].")
@click.option("--max-torrents", metavar="N", help="Most swarms held [100000].")
@click.option("--max-peers-per-torrent", metavar="N", help="Most peers in one swarm [20000].")
@click.option("--max-peers", metavar="N", help="Most peers over all swarms [2000000].")
@click.option(
    "--announce-rate", metavar="PER_SECOND",
    help="Announces+scrapes per second allowed from one address [200].",
)  # fmt: skip
@click.option(
    "--announce-burst", metavar="N", help="Requests one address may send at once [3000]."
)
@cluster_secret_option
@log_level_option
def tracker(config: Path | None, **flags: Any) -> None:
    """Run the BitTorrent HTTP tracker the seeders and agents announce to.

    Serves GET /announce (compact IPv4 `peers` and IPv6 `peers6`, or the dict form with
    compact=0; v1 and v2 info-hashes), GET /scrape (one or more info_hash; no full scrape),
    GET /healthz and GET /metrics (Prometheus). State is in memory: leechers re-announce
    every --interval seconds, seeds every --seed-interval, and are dropped after their TTL.
    With --cluster-secret, announces and scrapes need the cluster's token= and only they may
    set ip=. Put its URL, http://HOST:PORT/announce, in the seeder's `tracker` list. Stops
    cleanly on SIGTERM.
    """
    from p2p_mirror.tracker.server import check_config, run_tracker

    cfg = load_or_exit(TrackerConfig, config, flags)
    try:
        check_config(cfg)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    setup_logging(cfg.log_level)
    run_tracker(cfg)
