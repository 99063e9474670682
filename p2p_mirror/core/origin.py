"""The one client of origin registries: URLs, credential passthrough, TLS, retries.

The client's own ``Authorization`` header is forwarded as is, so the origin decides who
may read what; a ``401`` and its ``WWW-Authenticate`` challenge go back to the client.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Mapping

import aiohttp
from multidict import CIMultiDict
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    retry_if_not_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from p2p_mirror import __version__
from p2p_mirror.core.config import Upstream
from p2p_mirror.core.oci import Digest, OCIError
from p2p_mirror.core.redirects import (
    MAX_REDIRECTS,
    RedirectRefused,
    check_target,
    next_hop,
    same_origin,
)
from p2p_mirror.core.tls import TLSError, client_context

log = logging.getLogger(__name__)

# Headers a registry response carries that the client needs to see.
RESPONSE_HEADERS = (
    "Content-Type",
    "Content-Length",
    "Docker-Content-Digest",
    "Docker-Distribution-API-Version",
    "WWW-Authenticate",
    "ETag",
)


class OriginUnavailable(RuntimeError):
    """The origin did not answer (connection refused, timeout, 5xx after retries)."""


class _Retryable(Exception):
    pass


RETRYABLE = (aiohttp.ClientConnectionError, TimeoutError, _Retryable)


def forward_headers(headers: Mapping[str, str], accept: list[str] | None = None) -> CIMultiDict:
    """The request headers an origin needs: credentials and every ``Accept`` the client sent."""
    out: CIMultiDict[str] = CIMultiDict()
    if "Authorization" in headers:
        out["Authorization"] = headers["Authorization"]
    for value in accept or []:
        out.add("Accept", value)
    return out


class Origin:
    """Talks to upstream registries on behalf of clients."""

    def __init__(self, timeout: float, role: str, attempts: int = 3) -> None:
        self.user_agent = f"p2p-mirror/{__version__} ({role})"
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=timeout)
        self.attempts = attempts
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=256, ttl_dns_cache=60)
            self._session = aiohttp.ClientSession(
                timeout=self.timeout, connector=connector, auto_decompress=False
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    @staticmethod
    def url(upstream: Upstream, name: str, kind: str, ref: str) -> str:
        return f"{upstream.url}/v2/{name}/{kind}/{ref}"

    @staticmethod
    def _ssl(upstream: Upstream) -> ssl.SSLContext | bool:
        """Verified by default (system roots, or the registry's own ``ca_file``)."""
        try:
            return client_context(upstream.ca_file, upstream.verify_tls)
        except TLSError as e:
            raise OriginUnavailable(f"{upstream.name}: {e}") from None

    async def request(
        self,
        method: str,
        upstream: Upstream,
        name: str,
        kind: str,
        ref: str,
        headers: CIMultiDict,
    ) -> tuple[int, CIMultiDict, bytes]:
        """A small request (manifest, HEAD), retried on connection errors and 5xx."""
        url = self.url(upstream, name, kind, ref)
        headers = CIMultiDict(headers)
        headers["User-Agent"] = self.user_agent
        try:
            async for attempt in self._retrying():
                with attempt:
                    async with await self._send(method, upstream, url, headers) as resp:
                        body = await resp.read()
                        if resp.status >= 500:
                            raise _Retryable(f"{resp.status} from {url}")
                        return resp.status, _keep(resp.headers), body
        except (aiohttp.ClientError, TimeoutError, _Retryable, RedirectRefused) as e:
            raise OriginUnavailable(f"{upstream.name}: {e}") from None
        raise AssertionError("unreachable")

    async def _send(
        self, method: str, upstream: Upstream, url: str, headers: CIMultiDict
    ) -> aiohttp.ClientResponse:
        """One request, following the origin's redirects only where ``check_target`` allows
        (never down to http, never into internal addresses); the client's credentials go
        only to the registry's own origin, not to the storage a blob redirects to."""
        for _ in range(MAX_REDIRECTS + 1):
            resp = await self.session.request(
                method, url, headers=headers, ssl=self._ssl(upstream), allow_redirects=False
            )
            target = next_hop(url, resp.status, resp.headers.get("Location"))
            if target is None:
                return resp
            resp.release()
            await check_target(target, upstream)
            if not same_origin(upstream.url, target):
                headers = CIMultiDict(headers)
                headers.popall("Authorization", None)
            if resp.status == 303 and method != "HEAD":
                method = "GET"
            url = target
        raise RedirectRefused(f"{upstream.name}: more than {MAX_REDIRECTS} redirects")

    async def open_blob(
        self,
        upstream: Upstream,
        name: str,
        digest: Digest,
        headers: CIMultiDict,
        offset: int = 0,
    ) -> aiohttp.ClientResponse:
        """Start a blob download (from ``offset``); the caller reads and releases the response."""
        url = self.url(upstream, name, "blobs", str(digest))
        send = CIMultiDict(headers)
        send["User-Agent"] = self.user_agent
        if offset:
            send["Range"] = f"bytes={offset}-"
        try:
            async for attempt in self._retrying():
                with attempt:
                    resp = await self._send("GET", upstream, url, send)
                    if resp.status >= 500:
                        resp.release()
                        raise _Retryable(f"{resp.status} from {url}")
                    return resp
        except (aiohttp.ClientError, TimeoutError, _Retryable, RedirectRefused) as e:
            raise OriginUnavailable(f"{upstream.name}: {e}") from None
        raise AssertionError("unreachable")

    def _retrying(self) -> AsyncRetrying:
        return AsyncRetrying(
            stop=stop_after_attempt(self.attempts),
            wait=wait_exponential(multiplier=0.2, max=2),
            # A certificate that fails verification fails the same way on every attempt.
            retry=retry_if_exception_type(RETRYABLE)
            & retry_if_not_exception_type(aiohttp.ClientSSLError),
            reraise=True,
        )


def _keep(headers: Mapping[str, str]) -> CIMultiDict:
    out: CIMultiDict[str] = CIMultiDict()
    for key in RESPONSE_HEADERS:
        for value in headers.getall(key, []) if hasattr(headers, "getall") else []:
            out.add(key, value)
    return out


def error_for_status(status: int, kind: str) -> OCIError:
    """Map an origin's refusal to the OCI error the client should see."""
    if status == 401:
        return OCIError("UNAUTHORIZED", "authentication required")
    if status == 403:
        return OCIError("DENIED", "requested access to the resource is denied")
    if status == 404:
        code = "BLOB_UNKNOWN" if kind == "blobs" else "MANIFEST_UNKNOWN"
        return OCIError(code, f"{kind[:-1]} unknown to registry")
    if status == 429:
        return OCIError("TOOMANYREQUESTS", "origin rate limit")
    return OCIError("UNAVAILABLE", f"origin answered {status}")
