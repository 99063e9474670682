"""The cluster secret: per-use tokens, constant-time checks, safe files."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2p_mirror.core.clusterauth import (
    SEEDER_API,
    TRACKER,
    ClusterAuth,
    ClusterSecretError,
    generate_secret,
    load_secret,
)


def test_tokens_differ_per_use_and_per_secret() -> None:
    a, b = ClusterAuth(b"s" * 32, "test"), ClusterAuth(b"t" * 32, "test")
    assert a.token(SEEDER_API) != a.token(TRACKER)
    assert a.token(SEEDER_API) != b.token(SEEDER_API)
    assert b"s" * 32 not in a.token(SEEDER_API).encode()
    assert a.accepts(SEEDER_API, a.token(SEEDER_API))
    assert not a.accepts(SEEDER_API, a.token(TRACKER))
    assert not a.accepts(SEEDER_API, b.token(SEEDER_API))
    assert not a.accepts(SEEDER_API, None)
    assert not a.accepts(SEEDER_API, "")


def test_open_cluster_accepts_anything_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    auth = ClusterAuth(None, "agent")
    assert not auth.enabled and auth.token(TRACKER) == ""
    assert auth.accepts(TRACKER, None)
    assert "agent runs without --cluster-secret" in caplog.text


def test_generated_secret_loads_and_is_private(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    generate_secret(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(load_secret(path)) == 64
    with pytest.raises(FileExistsError):
        generate_secret(path)


@pytest.mark.parametrize(
    ("content", "mode", "message"),
    [(b"short\n", 0o600, "at least 16 bytes"), (b"x" * 32, 0o644, "readable by group or others")],
)
def test_bad_secret_files_are_refused(tmp_path: Path, content: bytes, mode: int,
                                      message: str) -> None:
    path = tmp_path / "secret"
    path.write_bytes(content)
    path.chmod(mode)
    with pytest.raises(ClusterSecretError, match=message):
        load_secret(path)
    with pytest.raises(ClusterSecretError, match="cannot read"):
        load_secret(tmp_path / "missing")
