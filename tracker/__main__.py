"""``python -m tracker``: the same command as ``p2p-mirror tracker``."""

from tracker.cli import tracker

if __name__ == "__main__":
    tracker(prog_name="p2p-mirror tracker")
