"""The seeder's own registry credentials and the registry token dance with them.

``registry_auth`` is a Docker ``config.json`` (a Kubernetes ``dockerconfigjson`` Secret, or
``~/.docker/config.json``): ``auths.<registry>.auth`` (base64 ``user:password``) or
``username``/``password``. Clients' credentials never reach the seeder (docs/security.md,
rule 3); what it fetches, it fetches with these. Nothing here logs a credential or a token.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from multidict import CIMultiDict

from p2p_mirror.core.config import DOCKER_HUB, Upstream
from p2p_mirror.core.redirects import RedirectRefused, check_target

log = logging.getLogger(__name__)
DOCKER_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "registry-1.docker.io")
TOKEN_CACHE_ENTRIES = 1000  # (registry, repository) tokens kept at most
DEFAULT_TOKEN_SECONDS = 60.0  # a token response without ``expires_in`` (the spec's default)
CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


class CredentialsError(ValueError):
    """The credentials file is unreadable or malformed (the message names no secret)."""


@dataclass(frozen=True)
class Login:
    username: str
    password: str = field(repr=False)

    def basic(self) -> str:
        pair = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(pair).decode()


def registry_key(key: str) -> str:
    """A config.json ``auths`` key as a registry name: ``https://ghcr.io/`` -> ``ghcr.io``."""
    text = key.strip()
    if text in DOCKER_HUB_KEYS:
        return DOCKER_HUB
    netloc = urlsplit(text if "://" in text else f"//{text}").netloc
    return netloc or text


def load_docker_config(path: Path) -> dict[str, Login]:
    """Registry name -> login from a Docker ``config.json``."""
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise CredentialsError(f"registry_auth {path}: cannot read: {e.strerror}") from None
    except ValueError:
        raise CredentialsError(f"registry_auth {path}: not valid JSON") from None
    auths = data.get("auths") if isinstance(data, dict) else None
    if not isinstance(auths, dict):
        raise CredentialsError(f"registry_auth {path}: no \"auths\" object")
    logins: dict[str, Login] = {}
    for key, entry in auths.items():
        name = registry_key(str(key))
        if not isinstance(entry, dict):
            raise CredentialsError(f"registry_auth {path}: auths.{key}: expected an object")
        if "auth" in entry:
            try:
                user, sep, password = base64.b64decode(str(entry["auth"]), validate=True) \
                    .decode().partition(":")  # fmt: skip
            except (binascii.Error, UnicodeDecodeError):
                sep = ""
            if not sep:
                raise CredentialsError(
                    f"registry_auth {path}: auths.{key}.auth: expected base64 of user:password"
                )
            logins[name] = Login(user, password)
        elif "username" in entry and "password" in entry:
            logins[name] = Login(str(entry["username"]), str(entry["password"]))
        elif "identitytoken" in entry:
            log.warning("registry_auth: auths.%s: identitytoken is not supported; ignored", key)
        else:
            raise CredentialsError(f"registry_auth {path}: auths.{key}: no credentials")
    return logins


class RegistryAuth:
    """The Authorization the seeder sends to each registry, per repository: a cached bearer
    token, else its login as Basic, else nothing (anonymous)."""

    def __init__(self, logins: dict[str, Login], session: aiohttp.ClientSession | None = None,
                 timeout: float = 30.0) -> None:  # fmt: skip
        self.logins = logins
        self._session = session
        self._own_session = session is None
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._tokens: dict[tuple[str, str], tuple[str, float]] = {}

    @classmethod
    def from_file(cls, path: Path | None) -> RegistryAuth:
        return cls(load_docker_config(path) if path is not None else {})

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self._session

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()

    def login_for(self, upstream: Upstream) -> Login | None:
        return self.logins.get(upstream.name) or self.logins.get(urlsplit(upstream.url).netloc)

    def headers(self, upstream: Upstream, repo: str) -> CIMultiDict:
        out: CIMultiDict[str] = CIMultiDict()
        token = self._tokens.get((upstream.name, repo))
        if token is not None and token[1] > time.monotonic():
            out["Authorization"] = f"Bearer {token[0]}"
        elif (login := self.login_for(upstream)) is not None:
            out["Authorization"] = login.basic()
        return out

    async def answer(self, upstream: Upstream, repo: str, challenge: str | None) -> bool:
        """After a 401 with ``challenge``: fetch a bearer token for ``repo`` (True if one was
        obtained, so the request is worth sending once more)."""
        if not challenge or not challenge.strip().lower().startswith("bearer "):
            return False  # Basic: the login (if any) was sent already
        params = dict(CHALLENGE_PARAM.findall(challenge))
        realm = params.get("realm", "")
        try:
            await check_target(realm, upstream)
        except RedirectRefused as e:
            log.warning("token realm refused: %s", e)
            return False
        query = {"scope": f"repository:{repo}:pull"}
        if "service" in params:
            query["service"] = params["service"]
        login = self.login_for(upstream)
        headers = {"Authorization": login.basic()} if login is not None else {}
        try:
            async with self.session.get(realm, params=query, headers=headers,
                                        allow_redirects=False) as resp:  # fmt: skip
                if resp.status != 200:
                    log.warning("%s: token endpoint answered %d", upstream.name, resp.status)
                    return False
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            log.warning("%s: token endpoint failed: %s", upstream.name, type(e).__name__)
            return False
        token = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            log.warning("%s: token endpoint sent no token", upstream.name)
            return False
        try:
            seconds = float(body.get("expires_in", DEFAULT_TOKEN_SECONDS))
        except (TypeError, ValueError):
            seconds = DEFAULT_TOKEN_SECONDS
        if len(self._tokens) >= TOKEN_CACHE_ENTRIES:
            self._tokens.clear()
        # renew a little early: a token that expires in flight costs a refused body
        self._tokens[(upstream.name, repo)] = (token, time.monotonic() + max(seconds - 5, 1))
        return True
