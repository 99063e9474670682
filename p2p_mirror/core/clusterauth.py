"""The cluster secret: agents, seeders and trackers prove they belong to the same cluster.

Each use gets its own token, an HMAC of the secret, so a token seen on the wire for one use
(a tracker URL, say) reveals neither the secret nor the token of another use.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
from pathlib import Path

TOKEN_HEADER = "X-P2P-Mirror-Token"  # the seeder API's token header
TRACKER_PARAM = "token"  # the tracker's announce/scrape query parameter
SEEDER_API = "seeder-api"
TRACKER = "tracker"
UDP_CONNECTION_ID = "udp-connection-id"  # the key of the UDP tracker's connection IDs
MIN_SECRET_BYTES = 16

log = logging.getLogger(__name__)


class ClusterSecretError(ValueError):
    """The cluster secret file is missing, unreadable, too short or readable by others."""


def load_secret(path: Path) -> bytes:
    """The secret in ``path`` (surrounding whitespace ignored), checked for length and mode."""
    try:
        st = path.stat()
        data = path.read_bytes().strip()
    except OSError as e:
        raise ClusterSecretError(f"cluster secret {path}: cannot read: {e.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO) and not _is_kubernetes_secret(path):
        raise ClusterSecretError(
            f"cluster secret {path}: readable by group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); chmod 600 it"
        )
    if len(data) < MIN_SECRET_BYTES:
        raise ClusterSecretError(
            f"cluster secret {path}: at least {MIN_SECRET_BYTES} bytes expected, got {len(data)}"
        )
    return data


def _is_kubernetes_secret(path: Path) -> bool:
    # Kubernetes mounts Secret files through a ..data symlink with the volume's defaultMode;
    # the pod's own user is the only reader there, whatever the mode bits say.
    return (path.parent / "..data").is_symlink()


def generate_secret(path: Path) -> None:
    """Write a fresh random secret to ``path`` (mode 0600), unless the file exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")


class ClusterAuth:
    """Tokens for each use of the secret; ``None`` secret: an open cluster (a one-machine lab)."""

    def __init__(self, secret: bytes | None, role: str) -> None:
        self.secret = secret
        if secret is None:
            log.warning(
                "%s runs without --cluster-secret: any host that reaches its ports is trusted "
                "(for a lab on one machine only)", role,
            )

    @classmethod
    def from_file(cls, path: Path | None, role: str) -> ClusterAuth:
        return cls(load_secret(path) if path is not None else None, role)

    @property
    def enabled(self) -> bool:
        return self.secret is not None

    def token(self, use: str) -> str:
        """The token for ``use`` (empty in an open cluster)."""
        if self.secret is None:
            return ""
        return hmac.new(self.secret, use.encode(), hashlib.sha256).hexdigest()

    def accepts(self, use: str, presented: str | None) -> bool:
        """Whether ``presented`` is the token for ``use``, compared in constant time."""
        if self.secret is None:
            return True
        return presented is not None and hmac.compare_digest(
            presented.encode(), self.token(use).encode()
        )
