"""The dealing policy: which agent takes which run of a segment's pieces from the seeder.

The seeder's upload link carries every byte once at the origin's pace, so it must not send
a piece twice. It does not announce to the tracker: it splits each segment's pieces over the
agents waiting for it in even runs of consecutive pieces (one request each), and each agent
gets every other piece from its peers. So every agent has something to share the moment a
segment is out, and every downlink carries an even share of the seeder's stream.

The runs leave through one send queue, a few at a time (``piece_sends``): N runs sent side
by side would all become complete, and shareable, only at the end; in turn, the first is
out at once. One at a time cannot fill the link when a send outgrows the socket buffer.
"""

from __future__ import annotations

import random
from collections import Counter

from p2p_mirror.seeder.link_queue import LinkQueue

MAX_AGENTS_REMEMBERED = 100_000  # the per-agent piece counts are forgotten beyond this
SEND_PATIENCE = 1.0  # a run's send this long without draining lets the next one start


class Dealer:
    """Assigns runs of pieces, agents with the fewest pieces so far first (ties: random),
    and holds the queue the runs are sent in (``send_queue``)."""

    def __init__(self, piece_sends: int) -> None:
        self.assigned_pieces: Counter[str] = Counter()  # pieces assigned to each agent so far
        self.send_queue = LinkQueue(piece_sends, SEND_PATIENCE)

    def assign(self, num_pieces: int, agents: list[str]) -> dict[str, list[int]]:
        """Split ``num_pieces`` pieces into even runs of consecutive pieces over ``agents``
        (at most one run each, at least one piece per run)."""
        if len(self.assigned_pieces) > MAX_AGENTS_REMEMBERED:
            self.assigned_pieces.clear()
        agents = list(agents)
        random.shuffle(agents)  # ties: random
        agents.sort(key=lambda a: self.assigned_pieces[a])
        agents = agents[:num_pieces]  # at least one piece each
        runs = {agent: list(range(i * num_pieces // len(agents),
                                  (i + 1) * num_pieces // len(agents)))
                for i, agent in enumerate(agents)}  # fmt: skip
        for agent, run in runs.items():
            self.assigned_pieces[agent] += len(run)
        return runs
