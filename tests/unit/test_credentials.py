"""The seeder's registry credentials file (a Docker config.json)."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import pytest

from p2p_mirror.core.config import Upstream
from p2p_mirror.seeder.credentials import CredentialsError, RegistryAuth, load_docker_config


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return path


def test_auth_and_username_password_entries(tmp_path: Path) -> None:
    path = write(tmp_path, {"auths": {
        "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:pw:with:colons").decode()},
        "https://ghcr.io/": {"username": "gh", "password": "tok"},
        "reg.test:5000": {"auth": base64.b64encode(b"alice:s3cret").decode()},
    }})
    logins = load_docker_config(path)
    assert (logins["docker.io"].username, logins["docker.io"].password) == ("hub", "pw:with:colons")
    assert logins["ghcr.io"].password == "tok"
    assert "s3cret" not in repr(logins["reg.test:5000"])
    auth = RegistryAuth(logins)
    assert auth.headers(Upstream("reg.test:5000", "http://127.0.0.1:1"), "a")["Authorization"] \
        == "Basic " + base64.b64encode(b"alice:s3cret").decode()  # fmt: skip
    # also found by the endpoint's host:port
    assert auth.login_for(Upstream("alias.test", "https://reg.test:5000")) is not None
    assert "Authorization" not in auth.headers(Upstream("other.test", "https://o"), "a")


def test_identity_token_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    path = write(tmp_path, {"auths": {"reg.test": {"identitytoken": "secret-token"}}})
    assert load_docker_config(path) == {}
    assert "identitytoken" in caplog.text and "secret-token" not in caplog.text


@pytest.mark.parametrize("data", [
    [], {"auths": []}, {"auths": {"r": "x"}}, {"auths": {"r": {"auth": "!!!"}}},
    {"auths": {"r": {"auth": base64.b64encode(b"no-colon").decode()}}}, {"auths": {"r": {}}},
])
def test_malformed_files_are_refused_without_their_content(tmp_path: Path, data) -> None:
    with pytest.raises(CredentialsError) as exc:
        load_docker_config(write(tmp_path, data))
    assert "no-colon" not in str(exc.value) and "!!!" not in str(exc.value)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match="cannot read"):
        load_docker_config(tmp_path / "missing.json")
