"""The proxy's request parsing and refusals, and the node-local CA (no sockets)."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest
from cryptography import x509

from p2p_mirror.agent.proxy import (
    ProxyRefusal,
    absolute_authority,
    parse_authority,
    parse_head,
    proxied_registries,
    registry_name,
)
from p2p_mirror.core.config import ConfigError, parse_registries
from p2p_mirror.core.tls import (
    LeafCache,
    TLSError,
    ca_paths,
    client_context,
    load_or_create_ca,
    mint,
    read_ca_cert,
)


def test_parse_head_reads_connect_and_headers() -> None:
    head = parse_head(b"CONNECT registry.example.test:443 HTTP/1.1\r\n"
                      b"Host: registry.example.test:443\r\nUser-Agent: Go\r\n\r\n")
    assert (head.method, head.target) == ("CONNECT", "registry.example.test:443")
    assert head.headers == {"host": "registry.example.test:443", "user-agent": "Go"}


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"CONNECT\r\n\r\n", 400),
        (b"CONNECT a b c HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\n\r\n", 505),
        (b"G(T / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n", 400),
    ],
)
def test_parse_head_refuses_malformed_requests(data: bytes, status: int) -> None:
    with pytest.raises(ProxyRefusal) as exc:
        parse_head(data)
    assert exc.value.status == status


@pytest.mark.parametrize(
    ("authority", "default", "expected"),
    [
        ("Registry.Example.Test:443", 443, ("registry.example.test", 443)),
        ("registry.example.test", 443, ("registry.example.test", 443)),
        ("reg.local:5000", 443, ("reg.local", 5000)),
        ("[::1]:8443", 443, ("::1", 8443)),
        ("10.0.0.5", 80, ("10.0.0.5", 80)),
    ],
)
def test_parse_authority(authority: str, default: int, expected: tuple[str, int]) -> None:
    assert parse_authority(authority, default) == expected


@pytest.mark.parametrize(
    "authority",
    ["", ":443", "host:99999", "host:0", "-bad.test:443", "bad.test.:443", "a/b:443",
     "user@host:443", "host:443:1", "[zz]:443", "ho st:443"],
)
def test_parse_authority_refuses_bad_hosts(authority: str) -> None:
    with pytest.raises(ProxyRefusal) as exc:
        parse_authority(authority, 443)
    assert exc.value.status == 400


def test_registry_name_drops_the_default_port_only() -> None:
    assert registry_name("registry.example.test", 443, 443) == "registry.example.test"
    assert registry_name("reg.local", 5000, 443) == "reg.local:5000"
    assert registry_name("reg.local", 80, 80) == "reg.local"
    assert registry_name("::1", 5000, 443) == "[::1]:5000"


def test_absolute_authority() -> None:
    assert absolute_authority("http://reg.local:5000/v2/a/b") == "reg.local:5000"
    assert absolute_authority("HTTP://reg.local") == "reg.local"
    for bad in ("/v2/", "https://reg.local/v2/", "http:///v2/", "ftp://x/"):
        with pytest.raises(ProxyRefusal):
            absolute_authority(bad)
    with pytest.raises(ProxyRefusal, match="credentials"):
        absolute_authority("http://user:pw@reg.local/v2/")


def test_proxied_registries_adds_the_default_one() -> None:
    assert proxied_registries(["a.test"], "docker.io") == {"a.test", "docker.io"}


# -- the node CA -------------------------------------------------------------------------------


def test_ca_is_made_once_with_a_private_key(tmp_path: Path) -> None:
    ca = load_or_create_ca(tmp_path)
    cert_path, key_path = ca_paths(tmp_path)
    assert key_path.stat().st_mode & 0o777 == 0o600
    assert key_path.stat().st_uid == os.geteuid()
    assert cert_path.parent.stat().st_mode & 0o777 == 0o700
    again = load_or_create_ca(tmp_path)
    assert again.cert_pem == ca.cert_pem == cert_path.read_bytes()
    assert read_ca_cert(cert_path) == ca.cert_pem
    basic = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca and basic.path_length == 0


def test_ca_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    load_or_create_ca(tmp_path)
    _, key_path = ca_paths(tmp_path)
    key_path.chmod(0o644)
    with pytest.raises(TLSError, match="other users read"):
        load_or_create_ca(tmp_path)


def test_ca_key_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    load_or_create_ca(tmp_path)
    _, key_path = ca_paths(tmp_path)
    os.chown(key_path, 65534, 65534)
    with pytest.raises(TLSError, match="owned by uid 65534"):
        load_or_create_ca(tmp_path)


def test_mismatched_ca_files_are_refused(tmp_path: Path) -> None:
    load_or_create_ca(tmp_path / "a")
    load_or_create_ca(tmp_path / "b")
    ca_paths(tmp_path / "a")[0].write_bytes(ca_paths(tmp_path / "b")[0].read_bytes())
    with pytest.raises(TLSError, match="does not belong"):
        load_or_create_ca(tmp_path / "a")


def test_leaf_names_the_host_and_chains_to_the_ca(tmp_path: Path) -> None:
    ca = load_or_create_ca(tmp_path)
    cert_pem, _ = mint(ca, "registry.example.test")
    leaf = x509.load_pem_x509_certificate(cert_pem)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["registry.example.test"]
    assert leaf.issuer == ca.cert.subject
    leaf.verify_directly_issued_by(ca.cert)
    ip_leaf = x509.load_pem_x509_certificate(mint(ca, "10.0.0.5")[0])
    ip_san = ip_leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ip_san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]


def test_leaf_cache_is_bounded_and_reuses_contexts(tmp_path: Path) -> None:
    cache = LeafCache(load_or_create_ca(tmp_path), size=2)
    first = cache.context("a.test")
    assert cache.context("a.test") is first
    cache.context("b.test")
    cache.context("c.test")
    assert len(cache) == 2
    assert cache.context("a.test") is not first  # evicted, minted again
    assert not list(tmp_path.rglob("*.pem"))  # leaf keys never touch the disk


def test_read_ca_cert_refuses_a_leaf(tmp_path: Path) -> None:
    cert_pem, _ = mint(load_or_create_ca(tmp_path), "x.test")
    (tmp_path / "leaf.crt").write_bytes(cert_pem)
    with pytest.raises(TLSError, match="not a CA"):
        read_ca_cert(tmp_path / "leaf.crt")
    (tmp_path / "junk.crt").write_text("junk")
    with pytest.raises(TLSError, match="not a readable PEM"):
        read_ca_cert(tmp_path / "junk.crt")


# -- origin TLS settings -----------------------------------------------------------------------


def test_registry_tls_settings(tmp_path: Path) -> None:
    load_or_create_ca(tmp_path)
    ca_file = ca_paths(tmp_path)[0]
    regs = parse_registries({
        "a.test": {"url": "https://10.0.0.1", "ca_file": str(ca_file)},
        "b.test": {"url": "https://10.0.0.2", "insecure": True},
        "c.test": "https://10.0.0.3",
    })
    assert regs["a.test"].ca_file == ca_file and regs["a.test"].verify_tls
    assert not regs["b.test"].verify_tls
    assert regs["c.test"].verify_tls and regs["c.test"].ca_file is None
    ctx = client_context(ca_file, True)
    assert not isinstance(ctx, bool) and ctx.verify_mode.name == "CERT_REQUIRED"
    assert client_context(None, True) is True
    assert client_context(ca_file, False) is False


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"url": "https://h", "ca_file": "/nonexistent/ca.crt"}, "not a readable file"),
        ({"url": "https://h", "insecure": True, "verify_tls": True}, "contradict"),
        ({"url": "http://h", "ca_file": __file__}, "needs an https"),
    ],
)
def test_bad_registry_tls_settings_are_refused(spec: dict, words: str) -> None:
    with pytest.raises((ValueError, ConfigError), match=words):
        parse_registries({"a.test": spec})
