"""The node's address: what the agent announces to trackers and binds BitTorrent to.

Trackers behind kube-proxy (or any NAT) see a rewritten source address; the agent names
its node's address itself (``announce_ip``, from the downward API's ``status.hostIP``).
BitTorrent then listens on that address only, unless ``bt_listen`` names one already or
the address is not this host's (a NAT's public side): listening on every interface would
answer peers on networks the node was never meant to serve.
"""

from __future__ import annotations

import ipaddress
import logging
import socket

from p2p_mirror.core.config import HostPort

log = logging.getLogger(__name__)
WILDCARDS = ("0.0.0.0", "::")


def is_local(address: str) -> bool:
    """Whether this host has ``address`` (a socket can bind to it)."""
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((address, 0))
        except OSError:
            return False
    return True


def bt_listen_for(listen: HostPort, announce_ip: str | None) -> HostPort:
    """``listen``, narrowed to ``announce_ip`` when it is the wildcard and the address is
    this host's."""
    if not announce_ip or listen.host not in WILDCARDS:
        return listen
    if not is_local(announce_ip):
        log.warning("announce_ip %s is not an address of this host (a NAT's?); BitTorrent "
                    "listens on %s", announce_ip, listen)  # fmt: skip
        return listen
    return HostPort(announce_ip, listen.port)
