"""BitTorrent HTTP tracker (BEP 3/7/23/48/52) for p2p-mirror's swarms.

In-memory, one process: peers announce every ``interval`` seconds and are forgotten after
``peer_ttl``; run a few for redundancy (clients announce to all trackers in a torrent).
"""
