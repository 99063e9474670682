"""Generated OCI images for the lab: no Docker engine, deterministic bytes, known contents.

``build_image`` writes an OCI image layout whose layers are uncompressed tars, each holding a
blob of seeded pseudo-random (incompressible) bytes and a small text file a test can read back
from the unpacked rootfs. ``push_image`` copies it to a registry with ``skopeo`` keeping every
digest, so the registry serves exactly the bytes we generated.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import platform
import random
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from lab.procs import netns_prefix

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
REF_NAME = "org.opencontainers.image.ref.name"
CHUNK = 1 << 20


@dataclass(frozen=True)
class Layer:
    digest: str
    size: int  # the tar blob's size (what a registry serves)
    data_size: int  # bytes of random data in ``data_file``
    files: tuple[str, ...]
    data_file: str
    text_file: str
    text: bytes


@dataclass(frozen=True)
class ImageLayout:
    path: Path
    manifest_digest: str
    manifest_size: int
    config_digest: str
    config_size: int
    layers: tuple[Layer, ...]
    ref_name: str = "latest"
    seed: int = 0

    @property
    def total_size(self) -> int:
        """Bytes a full pull transfers: manifest + config + all layers."""
        return self.manifest_size + self.config_size + sum(layer.size for layer in self.layers)

    def blob_path(self, digest: str) -> Path:
        algo, hexd = digest.split(":", 1)
        return self.path / "blobs" / algo / hexd

    def manifest(self) -> dict:
        return json.loads(self.blob_path(self.manifest_digest).read_bytes())


@dataclass(frozen=True)
class PushedImage:
    """A layout pushed to a registry (``HOST:PORT``) as ``repo:tag``."""

    layout: ImageLayout
    registry: str
    repo: str
    tag: str

    @property
    def name(self) -> str:
        """``repo:tag`` (prefix any registry name you route through hosts.toml)."""
        return f"{self.repo}:{self.tag}"

    @property
    def ref(self) -> str:
        """``HOST:PORT/repo:tag``: the image at the registry it was pushed to."""
        return f"{self.registry}/{self.repo}:{self.tag}"


class _SeededStream(io.RawIOBase):
    """``size`` pseudo-random bytes from a seeded generator, read in chunks (low memory)."""

    def __init__(self, size: int, seed: int) -> None:
        self._left = size
        self._rng = random.Random(seed)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        n = self._left if n is None or n < 0 else min(n, self._left)
        data = self._rng.randbytes(n)
        self._left -= n
        return data

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


class _HashingWriter:
    """Writes to a file while hashing, so a big layer is never read back to digest it."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, b: bytes | bytearray | memoryview) -> int:
        self.sha.update(b)
        self._f.write(b)
        self.size += len(b)
        return len(b)

    def tell(self) -> int:
        return self.size


def _tarinfo(name: str, size: int, mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = mode
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _dirinfo(name: str) -> tarfile.TarInfo:
    info = _tarinfo(name, 0, 0o755)
    info.type = tarfile.DIRTYPE
    return info


def _write_blob(blobs: Path, data: bytes) -> tuple[str, int]:
    hexd = hashlib.sha256(data).hexdigest()
    (blobs / hexd).write_bytes(data)
    return f"sha256:{hexd}", len(data)


def _layer_seed(seed: int, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "big")


def _build_layer(blobs: Path, index: int, size: int, seed: int) -> Layer:
    """One uncompressed tar layer: ``layerN/data.bin`` (random) and ``layerN/hello.txt``."""
    top = f"layer{index}"
    data_file = f"{top}/data.bin"
    text_file = f"{top}/hello.txt"
    text = f"p2p-mirror lab layer {index} seed {seed} size {size}\n".encode()
    fd, tmp = tempfile.mkstemp(prefix=".layer-", dir=blobs)
    try:
        with os.fdopen(fd, "wb") as raw:
            writer = _HashingWriter(raw)
            with tarfile.open(
                fileobj=writer,  # type: ignore[arg-type]
                mode="w",
                format=tarfile.USTAR_FORMAT,
            ) as tar:
                tar.copybufsize = CHUNK
                tar.addfile(_dirinfo(top))
                tar.addfile(_tarinfo(text_file, len(text)), io.BytesIO(text))
                stream = _SeededStream(size, _layer_seed(seed, index))
                tar.addfile(_tarinfo(data_file, size), stream)
        digest = f"sha256:{writer.sha.hexdigest()}"
        os.replace(tmp, blobs / writer.sha.hexdigest())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return Layer(
        digest=digest,
        size=writer.size,
        data_size=size,
        files=(top, text_file, data_file),
        data_file=data_file,
        text_file=text_file,
        text=text,
    )


def host_platform() -> tuple[str, str]:
    """(os, architecture) in OCI terms for this machine, so ``ctr pull`` picks our image."""
    machine = platform.machine().lower()
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(
        machine, machine
    )
    return "linux", arch


def build_image(
    workdir: Path, layer_sizes: list[int], seed: int, ref_name: str = "latest"
) -> ImageLayout:
    """Write an OCI image layout in ``workdir`` (created, must be empty or absent)."""
    workdir = Path(workdir)
    blobs = workdir / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (workdir / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    layers = tuple(_build_layer(blobs, i, size, seed) for i, size in enumerate(layer_sizes))
    os_name, arch = host_platform()
    config = {
        "architecture": arch,
        "os": os_name,
        "config": {"Cmd": ["/bin/true"], "Labels": {"p2p-lab.seed": str(seed)}},
        "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in layers]},
        "history": [{"created_by": f"p2p-mirror lab layer {i}"} for i in range(len(layers))],
    }
    config_digest, config_size = _write_blob(blobs, _canonical(config))
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
        "layers": [
            {"mediaType": OCI_LAYER_TAR, "digest": layer.digest, "size": layer.size}
            for layer in layers
        ],
    }
    manifest_digest, manifest_size = _write_blob(blobs, _canonical(manifest))
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": manifest_digest,
                "size": manifest_size,
                "annotations": {REF_NAME: ref_name},
                "platform": {"architecture": arch, "os": os_name},
            }
        ],
    }
    (workdir / "index.json").write_bytes(_canonical(index))
    return ImageLayout(
        path=workdir,
        manifest_digest=manifest_digest,
        manifest_size=manifest_size,
        config_digest=config_digest,
        config_size=config_size,
        layers=layers,
        ref_name=ref_name,
        seed=seed,
    )


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def push_image(
    layout: ImageLayout,
    registry: str,
    repo: str,
    tag: str,
    creds: tuple[str, str] | None = None,
    timeout: float = 600.0,
    netns: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """``skopeo copy --preserve-digests`` the layout to ``registry`` (``HOST:PORT``) over HTTP.

    ``netns``: run skopeo in that network namespace (a registry reachable only there).

    ``--preserve-digests`` makes skopeo fail rather than gzip our tar layers, so the registry
    holds exactly the generated blobs (the test checks the manifest digest it serves).
    """
    if shutil.which("skopeo") is None:
        raise FileNotFoundError("skopeo not found (apt-get install skopeo)")
    hostport = registry.split("://", 1)[-1].rstrip("/")
    argv = [
        *netns_prefix(netns),
        "skopeo",
        "--insecure-policy",
        "copy",
        "--preserve-digests",
        "--dest-tls-verify=false",
        "--retry-times",
        "2",
        f"oci:{layout.path}:{layout.ref_name}",
        f"docker://{hostport}/{repo}:{tag}",
    ]
    if creds is not None:
        argv[-2:-2] = ["--dest-creds", f"{creds[0]}:{creds[1]}"]
    # skopeo wants $HOME-ish dirs for its auth file lookups; keep it away from the user's.
    env = {**os.environ, "REGISTRY_AUTH_FILE": str(layout.path / ".auth.json")}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"skopeo copy failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc
