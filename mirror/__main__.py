"""``python -m mirror`` is the ``p2p-mirror`` command (works before the script is on PATH)."""

from mirror.cli import main

main()
