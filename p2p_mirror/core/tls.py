"""The node-local CA behind the agent's proxy, and the TLS contexts for origins.

The agent's proxy terminates TLS for the configured registries only, with a leaf certificate
minted for that host and signed by a CA made on first start in the agent's data dir. The
installer makes or reads the same CA (``load_or_create_ca``) to put it in dockerd's certs.d.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import os
import socket
import ssl
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DIR = "proxy-ca"
CA_CERT = "ca.crt"
CA_KEY = "ca.key"
CA_DAYS = 3650
LEAF_DAYS = 90
LEAF_CACHE = 128


class TLSError(RuntimeError):
    """The CA cannot be made, read or trusted; the message says which file and why."""


@dataclass(frozen=True)
class CA:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())


def ca_paths(data_dir: Path) -> tuple[Path, Path]:
    """Where the agent whose data dir is ``data_dir`` keeps its CA (certificate, key)."""
    return data_dir / CA_DIR / CA_CERT, data_dir / CA_DIR / CA_KEY


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def new_ca() -> CA:
    """A fresh CA (EC P-256, ten years, may sign leaves only)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "p2p-mirror"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"p2p-mirror node CA {socket.gethostname()}"[:64]),
    ])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=False, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          key_cert_sign=True, crl_sign=True, encipher_only=False,
                          decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CA(cert, key)


def _write_private(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` with ``mode`` from the first byte on (never briefly world-readable)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_or_create_ca(data_dir: Path) -> CA:
    """The CA in ``data_dir``, made (key mode 0600, dir 0700) if it is not there yet.

    Refuses a key that another user owns or that others can read: whoever can read it can
    mint certificates dockerd trusts for the configured registries.
    """
    cert_path, key_path = ca_paths(data_dir)
    if not key_path.exists():
        cert_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        ca = new_ca()
        # The key last: its presence means both files are complete.
        _write_private(cert_path, ca.cert_pem, 0o644)
        _write_private(key_path, ca.key_pem, 0o600)
        return ca
    st = key_path.stat()
    if st.st_uid != os.geteuid():
        raise TLSError(f"{key_path}: owned by uid {st.st_uid}, not by this process "
                       f"(uid {os.geteuid()}); refusing to use it")
    if st.st_mode & 0o077:
        raise TLSError(f"{key_path}: mode {st.st_mode & 0o777:04o} lets other users read the "
                       "CA key; chmod 600 it (or delete the CA dir to make a new one)")
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as e:
        raise TLSError(f"{cert_path.parent}: cannot load the CA: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or (
        key.public_key().public_numbers() != cert.public_key().public_numbers()  # type: ignore[union-attr]
    ):
        raise TLSError(f"{cert_path.parent}: {CA_CERT} does not belong to {CA_KEY}")
    return CA(cert, key)


def read_ca_cert(path: Path) -> bytes:
    """A CA certificate file (PEM), checked to be one."""
    try:
        data = path.read_bytes()
        cert = x509.load_pem_x509_certificate(data)
    except (OSError, ValueError) as e:
        raise TLSError(f"{path}: not a readable PEM certificate: {e}") from None
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise TLSError(f"{path}: not a CA certificate")
    return cert.public_bytes(serialization.Encoding.PEM)


def mint(ca: CA, host: str) -> tuple[bytes, bytes]:
    """A server certificate for ``host`` (a DNS name or an IP) signed by ``ca``: (cert, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        san = x509.DNSName(host)
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


class LeafCache:
    """Server contexts per host, minted on demand; the least recently used beyond ``size``
    are dropped (and minted again when asked for)."""

    def __init__(self, ca: CA, size: int = LEAF_CACHE) -> None:
        self.ca = ca
        self.size = size
        self._contexts: OrderedDict[str, ssl.SSLContext] = OrderedDict()

    def context(self, host: str) -> ssl.SSLContext:
        ctx = self._contexts.get(host)
        if ctx is not None:
            self._contexts.move_to_end(host)
            return ctx
        cert_pem, key_pem = mint(self.ca, host)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["http/1.1"])
        # ssl loads keys from files only: an anonymous memory file keeps the key off disk.
        fd = os.memfd_create("p2p-mirror-leaf")
        try:
            os.write(fd, key_pem + cert_pem + self.ca.cert_pem)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        self._contexts[host] = ctx
        while len(self._contexts) > self.size:
            self._contexts.popitem(last=False)
        return ctx

    def __len__(self) -> int:
        return len(self._contexts)


@functools.lru_cache(maxsize=64)
def client_context(ca_file: Path | None, verify: bool) -> ssl.SSLContext | bool:
    """What aiohttp's ``ssl=`` takes for an origin: verification on (the system roots, or
    ``ca_file`` alone), or off only when the registry is configured insecure."""
    if not verify:
        return False
    if ca_file is None:
        return True
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as e:
        raise TLSError(f"{ca_file}: cannot load the CA bundle: {e}") from None
