"""The held-back tail of a download (docs/security.md, rule 7)."""

from __future__ import annotations

import asyncio

import pytest

from p2p_mirror.agent.blob_download import HOLD_BACK, BlobDownload
from p2p_mirror.core.config import Upstream
from p2p_mirror.core.oci import Digest, OCIError

DIGEST = Digest.parse("sha256:" + "a" * 64)
SIZE = 3 * HOLD_BACK


def download() -> BlobDownload:
    return BlobDownload(DIGEST, SIZE, Upstream("r.test", "http://127.0.0.1:1"), "a", {})


async def test_the_tail_waits_for_the_digest() -> None:
    d = download()
    d.advance(SIZE)
    assert d.releasable == SIZE - HOLD_BACK
    waiter = asyncio.create_task(d.wait_beyond(SIZE - HOLD_BACK))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    d.digest_matched()
    await asyncio.wait_for(waiter, 1)
    assert d.releasable == SIZE


async def test_a_failed_download_gives_no_tail_even_with_bytes_in() -> None:
    d = download()
    d.advance(SIZE)
    d.finish(OCIError("DIGEST_INVALID", "mismatch"))
    for offset in (0, SIZE - HOLD_BACK):
        with pytest.raises(OCIError):
            await d.wait_beyond(offset)


async def test_verified_bytes_stay_readable_if_the_commit_fails() -> None:
    d = download()
    d.advance(SIZE)
    d.digest_matched()
    d.finish(OCIError("UNAVAILABLE", "disk"))
    await d.wait_beyond(SIZE - 1)
    with pytest.raises(OCIError):
        await d.wait_beyond(SIZE)


async def test_a_blob_smaller_than_the_hold_back_waits_whole() -> None:
    d = BlobDownload(DIGEST, 10, Upstream("r.test", "http://127.0.0.1:1"), "a", {})
    d.advance(10)
    assert d.releasable == 0
    d.finish()
    assert d.releasable == 10
