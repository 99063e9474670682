"""A real origin registry (Debian's ``docker-registry``, CNCF distribution 2.8) for the lab.

It runs on loopback (or inside a test's network namespace) with its storage in a temp dir and
its logs in a file, so tests can count exactly what the origin served: every request is one
access-log line with method, URI, status and body bytes written.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lab.procs import LabError, Proc, free_port, netns_prefix, port_open

REGISTRY_BIN = "docker-registry"
_BLOB_PATH = re.compile(r"^/v2/(?P<repo>.+)/blobs/(?P<digest>sha256:[0-9a-f]{64})$")
_MANIFEST_PATH = re.compile(r"^/v2/(?P<repo>.+)/manifests/(?P<ref>[^/]+)$")


# Gorilla's combined access log, one line per request (auth failures included).
_COMBINED = re.compile(
    r'^(?P<ip>\S+) \S+ (?P<user>\S+) \[(?P<time>[^\]]+)\] '
    r'"(?P<method>[A-Z]+) (?P<uri>\S+) [^"]*" (?P<status>\d{3}) (?P<size>\d+|-) '
    r'"[^"]*" "(?P<ua>[^"]*)"'
)


@dataclass(frozen=True)
class AccessRecord:
    """One request the registry answered, from its access-log line."""

    method: str
    uri: str
    status: int
    written: int
    remote_addr: str
    user_agent: str = ""
    time: str = ""

    @property
    def path(self) -> str:
        """The URI without its query string (containerd adds ``?ns=...`` via mirrors)."""
        return self.uri.split("?", 1)[0]

    @property
    def body_bytes(self) -> int:
        """Bytes of body on the wire (HEAD has none whatever the log says)."""
        return 0 if self.method == "HEAD" else self.written

    @property
    def blob_digest(self) -> str | None:
        m = _BLOB_PATH.match(self.path)
        return m.group("digest") if m else None

    @property
    def is_manifest(self) -> bool:
        return _MANIFEST_PATH.match(self.path) is not None


def parse_access_log(text: str) -> list[AccessRecord]:
    """Parse the registry's per-request access-log lines, in the order they were written.

    distribution also logs a JSON ``response completed`` line per request, but not for
    requests refused by auth; the combined-format access line is written for every request
    (after its last byte), with the body bytes written, so that is what we count.
    """
    records: list[AccessRecord] = []
    for line in text.splitlines():
        m = _COMBINED.match(line)
        if not m:
            continue
        size = m.group("size")
        records.append(
            AccessRecord(
                method=m.group("method"),
                uri=m.group("uri"),
                status=int(m.group("status")),
                written=0 if size == "-" else int(size),
                remote_addr=m.group("ip"),
                user_agent=m.group("ua"),
                time=m.group("time"),
            )
        )
    return records


def htpasswd_line(user: str, password: str) -> str:
    """One bcrypt htpasswd line (the only hash distribution's htpasswd auth accepts)."""
    try:
        import bcrypt
    except ImportError:
        bcrypt = None  # type: ignore[assignment]
    if bcrypt is not None:
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()
        return f"{user}:{hashed}"
    if shutil.which("htpasswd") is None:
        raise LabError("need python 'bcrypt' (pip) or 'htpasswd' (apt apache2-utils)")
    out = subprocess.run(
        ["htpasswd", "-nbB", "-C", "5", user, password],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def _free_port_in(netns: str, host: str) -> int:
    """A free port inside ``netns`` (its port space is not the host's)."""
    code = (
        "import socket,sys;s=socket.socket();s.bind((sys.argv[1],0));"
        "print(s.getsockname()[1])"
    )
    out = subprocess.run(
        [*netns_prefix(netns), "python3", "-c", code, host],
        check=True,
        capture_output=True,
        text=True,
        timeout=20,
    )
    return int(out.stdout.strip())


class Registry:
    """``docker-registry serve CONFIG.yml`` with temp storage, JSON logs, optional auth/proxy.

    Proxy mode (pull-through cache): distribution 2.8 fetches a missed blob from the remote
    twice (one stream for the client, one to store), so a cold miss costs 2x at the origin.
    """

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        netns: str | None = None,
        users: dict[str, str] | None = None,
        proxy_remote_url: str | None = None,
        proxy_username: str | None = None,
        proxy_password: str | None = None,
        log_level: str = "info",
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        self.tls = tls  # (certificate chain, key) PEM files: serve HTTPS
        self.host = host
        self.port = port
        self.netns = netns
        self.users = dict(users) if users else None
        self.proxy_remote_url = proxy_remote_url
        self.proxy_username = proxy_username
        self.proxy_password = proxy_password
        self.log_level = log_level
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="lab-reg-"))
        self.storage = self.workdir / "storage"
        self.config_path = self.workdir / "config.yml"
        self.log_path = self.workdir / "registry.log"
        self.proc: Proc | None = None

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def hostport(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.hostport}"

    def write_config(self) -> Path:
        """Write CONFIG.yml (JSON is valid YAML, so no quoting surprises)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage.mkdir(parents=True, exist_ok=True)
        config: dict[str, object] = {
            "version": 0.1,
            "log": {
                "level": self.log_level,
                "formatter": "json",
                "accesslog": {"disabled": False},
            },
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": self.hostport, "secret": secrets.token_hex(16)},
        }
        if self.tls:
            config["http"]["tls"] = {  # type: ignore[index]
                "certificate": str(self.tls[0]), "key": str(self.tls[1])}
        if self.users:
            htpasswd = self.workdir / "htpasswd"
            lines = [htpasswd_line(u, p) for u, p in self.users.items()]
            htpasswd.write_text("\n".join(lines) + "\n")
            config["auth"] = {"htpasswd": {"realm": "p2p-mirror-lab", "path": str(htpasswd)}}
        if self.proxy_remote_url:
            proxy: dict[str, str] = {"remoteurl": self.proxy_remote_url}
            if self.proxy_username is not None:
                proxy["username"] = self.proxy_username
                proxy["password"] = self.proxy_password or ""
            config["proxy"] = proxy
        self.config_path.write_text(json.dumps(config, indent=2) + "\n")
        return self.config_path

    def start(self, timeout: float = 20.0) -> Registry:
        if shutil.which(REGISTRY_BIN) is None:
            raise LabError(f"{REGISTRY_BIN} not found (apt-get install docker-registry)")
        if self.proc is not None and self.proc.alive():
            return self
        if self.port == 0:
            self.port = _free_port_in(self.netns, self.host) if self.netns else free_port(self.host)
        self.write_config()
        self.proc = Proc([REGISTRY_BIN, "serve", str(self.config_path)], self.log_path, self.netns)
        listening = f"listening on {self.hostport}"

        def ready() -> bool:
            if listening not in self.proc.log_text():  # type: ignore[union-attr]
                return False
            return True if self.netns else port_open(self.host, self.port)

        try:
            self.proc.wait_ready(ready, timeout, f"docker-registry on {self.hostport}")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the process by PID; remove the temp dir if this object made it."""
        if self.proc is not None:
            self.proc.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- accounting ------------------------------------------------------------------------

    def log_text(self) -> str:
        return self.proc.log_text() if self.proc else ""

    def requests(self, since: int = 0) -> list[AccessRecord]:
        """Every request answered so far (or after the ``mark()`` index ``since``)."""
        return parse_access_log(self.log_text())[since:]

    def mark(self, settle: bool = True) -> int:
        """An index for ``requests(since=...)``: count only what happens after this call.

        Settles first, so a request that finished just before is not counted after the mark.
        """
        if settle:
            self.settle()
        return len(self.requests())

    def settle(self, quiet: float = 0.4, timeout: float = 15.0) -> None:
        """Wait until no new request record arrived for ``quiet`` seconds.

        The registry logs a request after its last byte left, so a client may finish reading
        a moment before the record appears; call this before counting.
        """
        deadline = time.monotonic() + timeout
        count, since = len(self.requests()), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = len(self.requests())
            if now != count:
                count, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return

    def blob_fetches(self, since: int = 0) -> list[AccessRecord]:
        """GETs of ``/v2/<repo>/blobs/sha256:...`` answered 200 or 206 (bytes really sent)."""
        return [
            r
            for r in self.requests(since)
            if r.method == "GET" and r.blob_digest and r.status in (200, 206)
        ]

    def egress_bytes(self, since: int = 0) -> int:
        """Response body bytes the registry sent (all requests, error bodies included).

        HEAD answers are counted as 0: distribution logs the error body it "wrote" for a HEAD
        404, but Go's server never puts a HEAD body on the wire.
        """
        return sum(r.body_bytes for r in self.requests(since))

    def blob_egress_bytes(self, since: int = 0) -> int:
        return sum(r.written for r in self.blob_fetches(since))


def write_test_tls(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for ``host`` signed by it, as PEM files:
    (CA certificate, server chain, server key); for ``Registry(tls=(chain, key))``."""
    from p2p_mirror.core.tls import mint, new_ca

    directory.mkdir(parents=True, exist_ok=True)
    ca = new_ca()
    cert, key = mint(ca, host)
    paths = directory / "ca.crt", directory / "server.crt", directory / "server.key"
    paths[0].write_bytes(ca.cert_pem)
    paths[1].write_bytes(cert + ca.cert_pem)
    paths[2].write_bytes(key)
    paths[2].chmod(0o600)
    return paths


def registry_available() -> bool:
    return shutil.which(REGISTRY_BIN) is not None
