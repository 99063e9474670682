"""OCI distribution names, references and digests, and the spec's error responses.

Everything a client sends is validated here before it reaches a path or an upstream URL.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from aiohttp import web

# distribution/reference grammar (path components), lower case only.
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
DIGEST_RE = re.compile(r"^([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)$")
HEX_LENGTH = {"sha256": 64, "sha512": 128}
MAX_NAME = 255


class OCIError(Exception):
    """An error the distribution spec defines; rendered as its JSON body and HTTP status."""

    STATUS = {
        "BLOB_UNKNOWN": 404,
        "DIGEST_INVALID": 400,
        "MANIFEST_UNKNOWN": 404,
        "MANIFEST_INVALID": 400,
        "NAME_INVALID": 400,
        "NAME_UNKNOWN": 404,
        "SIZE_INVALID": 400,  # here: larger than max_blob_size, or a manifest above 4 MiB
        "PARAMETER_INVALID": 400,  # the seeder API's own: a malformed query parameter
        "UNAUTHORIZED": 401,
        "DENIED": 403,
        "UNSUPPORTED": 405,
        "TOOMANYREQUESTS": 429,
        "RANGE_INVALID": 416,
        "UNAVAILABLE": 503,
    }

    def __init__(self, code: str, message: str, detail: object = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.detail = code, message, detail
        self.status = self.STATUS[code]

    def response(self, headers: dict[str, str] | None = None) -> web.Response:
        err: dict[str, object] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            err["detail"] = self.detail
        return web.Response(
            status=self.status,
            body=json.dumps({"errors": [err]}).encode(),
            content_type="application/json",
            headers=headers,
        )


def validate_name(name: str) -> str:
    if len(name) > MAX_NAME or not NAME_RE.fullmatch(name):
        raise OCIError("NAME_INVALID", "invalid repository name", {"name": name[:300]})
    return name


@dataclass(frozen=True)
class Digest:
    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)

    @classmethod
    def parse(cls, text: str) -> Digest:
        """A digest we can verify: sha256 or sha512, lower-case hex of the right length."""
        m = DIGEST_RE.fullmatch(text)
        if not m:
            raise OCIError("DIGEST_INVALID", "invalid digest", {"digest": text[:200]})
        algorithm, value = m.groups()
        if algorithm not in HEX_LENGTH:
            raise OCIError("DIGEST_INVALID", f"unsupported digest algorithm {algorithm!r}")
        if len(value) != HEX_LENGTH[algorithm] or not re.fullmatch(r"[0-9a-f]+", value):
            raise OCIError("DIGEST_INVALID", "invalid digest", {"digest": text[:200]})
        return cls(algorithm, value)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())


def validate_reference(ref: str) -> str:
    """A manifest reference: a tag or a digest."""
    if ":" in ref:
        Digest.parse(ref)
        return ref
    if not TAG_RE.fullmatch(ref):
        raise OCIError("MANIFEST_UNKNOWN", "invalid tag", {"reference": ref[:200]})
    return ref


def looks_like_registry(component: str) -> bool:
    """Docker's rule: a first path component naming a registry has a dot, a port or is localhost."""
    return "." in component or ":" in component or component == "localhost"


@web.middleware
async def oci_http_errors(request: web.Request, handler) -> web.StreamResponse:
    """aiohttp's own refusals (no such route, wrong method) as OCI errors too, so a client
    never has to parse another error format."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status == 404:
            return OCIError("NAME_UNKNOWN", "no such endpoint").response()
        if e.status == 405:
            return OCIError("UNSUPPORTED", "method not allowed").response()
        raise
