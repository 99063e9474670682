"""Shared fixtures: the real origin registry, a generated image pushed to it, a containerd.

A missing binary skips the tests that need it on a developer's machine, but never in CI
(``CI=true``): there a missing part is a failure, so a green run means the parts really ran.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mirror.lab.containerd import Containerd
from mirror.lab.images import ImageLayout, PushedImage, build_image, push_image
from mirror.lab.registry import Registry

MiB = 1024 * 1024
DEMO_REPO = "library/demo"
DEMO_TAG = "v1"
DEMO_LAYER_SIZES = [1 * MiB, 2 * MiB, 3 * MiB]
DEMO_SEED = 1234


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def require_binaries(*names: str) -> None:
    """Skip (outside CI) or fail (in CI) when a real part this test needs is not installed."""
    missing = [n for n in names if shutil.which(n) is None]
    if not missing:
        return
    reason = f"not installed: {', '.join(missing)} (see .ci install step)"
    if in_ci():
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


def require_root() -> None:
    if os.geteuid() == 0:
        return
    if in_ci():
        pytest.fail("CI=true but not root (containerd and mounts need root)", pytrace=False)
    pytest.skip("needs root")


@pytest.fixture
def require() -> Callable[..., None]:
    """``require("strace", ...)``: skip outside CI, fail in CI, when a binary is missing."""
    return require_binaries


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """One origin registry on loopback for the session; count with ``mark()``/``since=``."""
    require_binaries("docker-registry")
    reg = Registry(tmp_path_factory.mktemp("registry"))
    reg.start()
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture
def registry_factory(tmp_path: Path) -> Iterator[Callable[..., Registry]]:
    """Start extra registries (auth, proxy, netns...) that are stopped after the test."""
    require_binaries("docker-registry")
    started: list[Registry] = []

    def make(**kw: object) -> Registry:
        reg = Registry(tmp_path / f"registry{len(started)}", **kw)  # type: ignore[arg-type]
        started.append(reg)
        return reg.start()

    try:
        yield make
    finally:
        for reg in reversed(started):
            reg.stop()


@pytest.fixture(scope="session")
def image_layout(tmp_path_factory: pytest.TempPathFactory) -> ImageLayout:
    """The demo image as an OCI layout: 3 uncompressed layers of 1, 2 and 3 MiB."""
    return build_image(tmp_path_factory.mktemp("image") / "oci", DEMO_LAYER_SIZES, DEMO_SEED)


@pytest.fixture(scope="session")
def image(registry: Registry, image_layout: ImageLayout) -> PushedImage:
    """The demo image pushed to the session registry as ``library/demo:v1``."""
    require_binaries("skopeo")
    push_image(image_layout, registry.hostport, DEMO_REPO, DEMO_TAG)
    return PushedImage(
        layout=image_layout, registry=registry.hostport, repo=DEMO_REPO, tag=DEMO_TAG
    )


@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[Containerd]:
    """A private, started containerd (own root/state/socket) in this test's tmp_path."""
    require_root()
    require_binaries("containerd", "ctr")
    ctd = Containerd(tmp_path / "containerd")
    ctd.start()
    try:
        yield ctd
    finally:
        ctd.stop()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Remember each phase's report on the item, so fixtures can dump logs on failure."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


def failed(request: pytest.FixtureRequest) -> bool:
    report = getattr(request.node, "rep_call", None)
    return report is None or report.failed


@contextlib.contextmanager
def http_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """``handler`` served on a loopback port from a thread while the block runs: its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
