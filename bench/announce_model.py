"""Announce load model: nodes x cached images x layers x segments -> announces/s -> trackers.

Every cached segment is a torrent the node seeds; torrents being downloaded are leeched.
Seeds announce every ``seed_interval`` (1800 s), leechers every ``interval`` (30 s), plus a
``started`` and a ``completed`` announce per downloaded torrent. Each torrent is announced to
2 trackers (a shard and a standby), so the trackers see twice the announces. Trackers needed
= total announces/s / (rate per core x target utilisation), at the rates ``bench/tracker.py``
measured (read from ``bench/results/tracker.json`` when present).

    python -m bench.announce_model
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Load:
    nodes: int
    torrents_per_node: int
    seeds_per_s: float  # announces/s from seeding torrents, whole cluster
    leech_per_s: float  # announces/s from downloads (started, interval, completed)
    all_at_short_interval: float  # before: every torrent every `interval`

    @property
    def total(self) -> float:
        return self.seeds_per_s + self.leech_per_s


def model(args: argparse.Namespace, nodes: int) -> Load:
    torrents = args.images * args.layers * args.segments
    seeds = nodes * torrents / args.seed_interval
    pulled_per_s = nodes * args.pulls_per_hour * args.layers * args.segments / 3600
    per_download = 2 + args.download_seconds / args.interval  # started, completed, intervals
    leech = pulled_per_s * per_download
    return Load(nodes, torrents, seeds, leech, nodes * torrents / args.interval)


def measured_rates(path: Path) -> dict[str, float]:
    if not path.exists():
        return {}
    rows = json.loads(path.read_text())
    return {f"{r['tracker']} ({r['mode']})": r["announces_per_core_s"] for r in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=30, help="images cached per node")
    parser.add_argument("--layers", type=int, default=10, help="layers per image")
    parser.add_argument("--segments", type=int, default=10, help="segment torrents per blob")
    parser.add_argument("--pulls-per-hour", type=float, default=2.0, help="image pulls per node")
    parser.add_argument("--download-seconds", type=float, default=60.0,
                        help="how long a torrent is leeched")  # fmt: skip
    parser.add_argument("--interval", type=float, default=30.0)
    parser.add_argument("--seed-interval", type=float, default=1800.0)
    parser.add_argument("--trackers-per-torrent", type=int, default=2)
    parser.add_argument("--utilisation", type=float, default=0.5, help="target tracker load")
    parser.add_argument("--rates", type=Path, default=RESULTS / "tracker.json")
    args = parser.parse_args()
    rates = measured_rates(args.rates) or {"assumed": 15000.0}
    loads = [model(args, n) for n in (1_000, 10_000)]
    print(f"{args.images} images x {args.layers} layers x {args.segments} segments cached per "
          f"node; {args.pulls_per_hour:g} pulls/h per node, {args.download_seconds:g} s "
          f"leeching; intervals {args.interval:g} s (leechers) and {args.seed_interval:g} s "
          f"(seeds); {args.trackers_per_torrent} trackers per torrent, target utilisation "
          f"{args.utilisation:.0%}\n")  # fmt: skip
    print("| nodes | torrents per node | announces/s, all every 30 s | seeds | downloads "
          "| total | received by trackers |")
    print("|---|---|---|---|---|---|---|")
    for ld in loads:
        print(f"| {ld.nodes:,} | {ld.torrents_per_node:,} | {ld.all_at_short_interval:,.0f} "
              f"| {ld.seeds_per_s:,.0f} | {ld.leech_per_s:,.0f} | {ld.total:,.0f} "
              f"| {ld.total * args.trackers_per_torrent:,.0f} |")  # fmt: skip
    print("\nTracker cores needed (announces to all trackers / (rate per core x utilisation)):\n")
    print("| tracker | announces/s per core | " + " | ".join(
        f"{ld.nodes:,} nodes (before / now)" for ld in loads) + " |")  # fmt: skip
    print("|---|---|" + "---|" * len(loads))
    for name, rate in rates.items():
        cells = []
        for ld in loads:
            cap = rate * args.utilisation
            before = math.ceil(ld.all_at_short_interval * args.trackers_per_torrent / cap)
            now = math.ceil(ld.total * args.trackers_per_torrent / cap)
            cells.append(f"{before:,} / {max(now, args.trackers_per_torrent):,}")
        print(f"| {name} | {rate:,.0f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
