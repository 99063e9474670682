"""The seeder <-> agent HTTP protocol: paths, parameters, headers and encodings both sides use."""

from __future__ import annotations

PIECES_HEADER = "X-P2P-Mirror-Pieces"  # the pieces this agent takes from the seeder itself
TORRENT_LENGTH_HEADER = "X-P2P-Mirror-Torrent-Length"  # inline: the body's torrent, then pieces
