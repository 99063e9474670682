"""OCI names, references, digests and error bodies: what a client sends is checked here."""

from __future__ import annotations

import hashlib
import json

import pytest

from p2p_mirror.core.oci import (
    MAX_NAME,
    Digest,
    OCIError,
    looks_like_registry,
    validate_name,
    validate_reference,
)

HEX256 = hashlib.sha256(b"x").hexdigest()
HEX512 = hashlib.sha512(b"x").hexdigest()


def code_of(exc: pytest.ExceptionInfo[OCIError]) -> str:
    return exc.value.code


# --- names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["alpine", "library/alpine", "a/b/c/d", "my-org/my_repo", "a__b/c.d", "x0/y-1--2",
     "a" * MAX_NAME, "team/sub.project/img"],
)
def test_validate_name_ok(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Library/alpine",
        "library/Alpine",
        "..",
        "a/../b",
        "../etc",
        "../../etc/passwd",
        "/abs",
        "trailing/",
        "a//b",
        "a" * (MAX_NAME + 1),
        "-lead",
        "a.-b",
        "a___b",
        "a b",
        "a/b\n",
        "a\\b",
        "a%2fb",
        "a:b",
        ".hidden",
    ],
)
def test_validate_name_rejects(name: str) -> None:
    with pytest.raises(OCIError) as exc:
        validate_name(name)
    assert code_of(exc) == "NAME_INVALID"
    assert exc.value.status == 400


# --- digests -----------------------------------------------------------------------------


def test_digest_parse_sha256_and_sha512() -> None:
    d = Digest.parse(f"sha256:{HEX256}")
    assert (d.algorithm, d.hex, str(d)) == ("sha256", HEX256, f"sha256:{HEX256}")
    assert Digest.parse(f"sha512:{HEX512}").hex == HEX512
    assert Digest.of(b"x") == d
    assert Digest.of(b"x", "sha512") == Digest("sha512", HEX512)
    h = d.hasher()
    h.update(b"x")
    assert h.hexdigest() == d.hex


@pytest.mark.parametrize(
    "text",
    [
        f"sha256:{HEX256.upper()}",
        f"sha256:{HEX256[:-1]}",
        f"sha256:{HEX256}0",
        f"sha256:{HEX512}",
        f"sha512:{HEX256}",
        f"md5:{hashlib.md5(b'x').hexdigest()}",
        f"SHA256:{HEX256}",
        HEX256,
        f"sha256:{HEX256[:-2]}/.",
        f"sha256:../{HEX256[3:]}",
        f"sha256:{HEX256}\n",
        f"sha256:{HEX256}/x",
        f"sha256:{'g' * 64}",
        f"sha256:{'=' * 64}",
        "sha256:",
        ":abc",
        "",
        f" sha256:{HEX256}",
    ],
)
def test_digest_parse_rejects(text: str) -> None:
    with pytest.raises(OCIError) as exc:
        Digest.parse(text)
    assert code_of(exc) == "DIGEST_INVALID"
    assert exc.value.status == 400


# --- references --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ref", ["latest", "v1.2.3", "1", "_x", "A-b_c.d", "a" * 128, f"sha256:{HEX256}"]
)
def test_validate_reference_ok(ref: str) -> None:
    assert validate_reference(ref) == ref


@pytest.mark.parametrize("ref", ["", ".x", "-x", "a" * 129, "a/b", "a b", "latest\n", "ta@g"])
def test_validate_reference_rejects_bad_tags(ref: str) -> None:
    with pytest.raises(OCIError) as exc:
        validate_reference(ref)
    assert code_of(exc) == "MANIFEST_UNKNOWN"


@pytest.mark.parametrize("ref", [f"sha256:{HEX256[:10]}", "md5:abc", "tag:withcolon"])
def test_validate_reference_rejects_bad_digests(ref: str) -> None:
    with pytest.raises(OCIError) as exc:
        validate_reference(ref)
    assert code_of(exc) == "DIGEST_INVALID"


# --- errors ------------------------------------------------------------------------------

# The distribution spec's error codes grouped by the status it gives them (plus 416 and 503,
# which the agent uses for Range and upstream failures).
SPEC_CODES_BY_STATUS = {
    400: ("DIGEST_INVALID", "MANIFEST_INVALID", "NAME_INVALID", "SIZE_INVALID"),
    401: ("UNAUTHORIZED",),
    403: ("DENIED",),
    404: ("BLOB_UNKNOWN", "MANIFEST_UNKNOWN", "NAME_UNKNOWN"),
    405: ("UNSUPPORTED",),
    416: ("RANGE_INVALID",),
    429: ("TOOMANYREQUESTS",),
    503: ("UNAVAILABLE",),
}
EXPECTED_STATUS = {code: status for status, codes in SPEC_CODES_BY_STATUS.items()
                   for code in codes}  # fmt: skip
# The seeder API's own code for a malformed query parameter (no spec code fits).
EXPECTED_STATUS["PARAMETER_INVALID"] = 400


def test_every_code_has_the_expected_status() -> None:
    assert OCIError.STATUS == EXPECTED_STATUS


@pytest.mark.parametrize(("code", "status"), sorted(EXPECTED_STATUS.items()))
def test_error_response_json_shape(code: str, status: int) -> None:
    resp = OCIError(code, "went wrong", {"k": "v"}).response({"X-Test": "1"})
    assert resp.status == status
    assert resp.content_type == "application/json"
    assert resp.headers["X-Test"] == "1"
    assert resp.body is not None
    assert json.loads(resp.body) == {
        "errors": [{"code": code, "message": "went wrong", "detail": {"k": "v"}}]
    }


def test_error_response_without_detail_omits_it() -> None:
    resp = OCIError("BLOB_UNKNOWN", "no such blob").response()
    body = {"errors": [{"code": "BLOB_UNKNOWN", "message": "no such blob"}]}
    assert json.loads(resp.body) == body
    assert str(OCIError("BLOB_UNKNOWN", "no such blob")) == "BLOB_UNKNOWN: no such blob"


def test_unknown_error_code_is_a_programming_error() -> None:
    with pytest.raises(KeyError):
        OCIError("NOT_A_CODE", "x")


@pytest.mark.parametrize(
    ("component", "expected"),
    [("ghcr.io", True), ("localhost", True), ("localhost:5000", True), ("127.0.0.1:5000", True),
     ("library", False), ("my-org", False)],
)
def test_looks_like_registry(component: str, expected: bool) -> None:
    assert looks_like_registry(component) is expected
