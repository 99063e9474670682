"""``python -m p2p_mirror`` is the ``p2p-mirror`` command (works before the script is on PATH)."""

from p2p_mirror.cli import main

if __name__ == "__main__":
    main()
