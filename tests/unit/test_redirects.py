"""Where an origin may redirect a role (issue 19, rule 6); IP literals only, no DNS."""

from __future__ import annotations

import pytest

from p2p_mirror.core.config import Upstream
from p2p_mirror.core.redirects import (
    RedirectRefused,
    address_kind,
    check_target,
    next_hop,
    same_origin,
)

PUBLIC_HTTPS = Upstream("reg.test", "https://93.184.216.34")
LOOPBACK_HTTP = Upstream("reg.test", "http://127.0.0.1:5000")
PRIVATE_HTTPS = Upstream("reg.test", "https://10.1.2.3")


@pytest.mark.parametrize(
    ("upstream", "target"),
    [
        (PUBLIC_HTTPS, "https://151.101.1.1/blob"),  # storage on the internet
        (LOOPBACK_HTTP, "http://127.0.0.1:9000/blob"),  # the registry's own kind of address
        (LOOPBACK_HTTP, "https://151.101.1.1/blob"),
        (PRIVATE_HTTPS, "https://10.9.9.9/blob"),
        (PRIVATE_HTTPS, "https://[2001:4860::1]/blob"),
    ],
)
async def test_allowed(upstream: Upstream, target: str) -> None:
    await check_target(target, upstream)


@pytest.mark.parametrize(
    ("upstream", "target"),
    [
        (PUBLIC_HTTPS, "http://151.101.1.1/blob"),  # down to plain http
        (PUBLIC_HTTPS, "https://127.0.0.1/blob"),
        (PUBLIC_HTTPS, "https://169.254.169.254/latest/meta-data"),
        (PUBLIC_HTTPS, "https://10.0.0.1/blob"),
        (PUBLIC_HTTPS, "https://[::1]/blob"),
        (PUBLIC_HTTPS, "https://[::ffff:127.0.0.1]/blob"),
        (PUBLIC_HTTPS, "https://[fd00::1]/blob"),
        (PUBLIC_HTTPS, "https://0.0.0.0/blob"),
        (PUBLIC_HTTPS, "file:///etc/passwd"),
        (PUBLIC_HTTPS, "https:///blob"),
        (LOOPBACK_HTTP, "http://169.254.169.254/"),  # loopback registry: still no metadata
        (LOOPBACK_HTTP, "http://10.0.0.1/"),
        (PRIVATE_HTTPS, "https://127.0.0.1/"),
        (PRIVATE_HTTPS, "http://10.9.9.9/blob"),
    ],
)
async def test_refused(upstream: Upstream, target: str) -> None:
    with pytest.raises(RedirectRefused):
        await check_target(target, upstream)


async def test_every_address_of_a_name_is_checked() -> None:
    import ipaddress

    async def resolver(host: str):
        if host == "storage.test":
            return [ipaddress.ip_address("151.101.1.1"), ipaddress.ip_address("127.0.0.1")]
        return [ipaddress.ip_address("93.184.216.34")]

    with pytest.raises(RedirectRefused):
        await check_target("https://storage.test/blob", PUBLIC_HTTPS, resolver)


def test_kinds_and_hops() -> None:
    import ipaddress

    assert address_kind(ipaddress.ip_address("100.64.0.1")) == "private"
    assert address_kind(ipaddress.ip_address("8.8.8.8")) == "public"
    assert next_hop("https://r/v2/a/blobs/x", 307, "/storage/x") == "https://r/storage/x"
    assert next_hop("https://r/v2/a/blobs/x", 200, "/storage/x") is None
    assert same_origin("https://r:443/v2", "https://r:443/x")
    assert not same_origin("https://r/v2", "https://s/x")
