"""BitTorrent listens on the node's announced address when it is this host's."""

from __future__ import annotations

from p2p_mirror.agent.node_address import bt_listen_for, is_local
from p2p_mirror.core.config import HostPort


def test_the_wildcard_narrows_to_a_local_announce_address_only() -> None:
    wildcard = HostPort("0.0.0.0", 6881)
    assert bt_listen_for(wildcard, None) == wildcard
    assert bt_listen_for(wildcard, "127.0.0.1") == HostPort("127.0.0.1", 6881)
    # TEST-NET-2 is no address of this host (a NAT's public side): keep listening as told
    assert not is_local("198.51.100.7")
    assert bt_listen_for(wildcard, "198.51.100.7") == wildcard
    # an explicit listen address wins
    own = HostPort("127.0.0.2", 7000)
    assert bt_listen_for(own, "127.0.0.1") == own
