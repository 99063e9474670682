"""p2p-mirror: a node-local OCI registry mirror that fetches blobs over BitTorrent."""

__version__ = "0.1.0"
