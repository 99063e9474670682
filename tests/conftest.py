"""Shared fixtures: the real origin registry, a generated image pushed to it, a containerd.

A missing binary skips the tests that need it on a developer's machine, but never in CI
(``CI=true``): there a missing part is a failure, so a green run means the parts really ran.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import require_binaries, require_root

from lab.containerd import Containerd
from lab.images import ImageLayout, PushedImage, build_image, push_image
from lab.registry import Registry

MiB = 1024 * 1024
DEMO_REPO = "library/demo"
DEMO_TAG = "v1"
DEMO_LAYER_SIZES = [1 * MiB, 2 * MiB, 3 * MiB]
DEMO_SEED = 1234
TIERS = ("unit", "component", "e2e")


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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with its tier, taken from its folder: ``pytest -m unit`` is the fast lane."""
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))
