"""Size bounds and transfer deadlines (core/bounds.py)."""

from __future__ import annotations

import pytest

from p2p_mirror.core.bounds import TooLarge, check_size, content_length, transfer_deadline


def test_a_size_within_its_bound_passes_and_a_larger_one_names_the_key() -> None:
    assert check_size("blob", 10, 10, "max_blob_size") == 10
    assert check_size("blob", 1 << 45, 0, "max_blob_size") == 1 << 45  # 0: no bound
    with pytest.raises(TooLarge, match="max_blob_size"):
        check_size("blob", 11, 10, "max_blob_size")


@pytest.mark.parametrize(
    ("value", "length"),
    [("0", 0), ("123", 123), ("", None), ("-1", None), ("1e3", None), ("12x", None),
     ("9" * 21, None), ("\u0661", None)],
)  # fmt: skip
def test_content_length_is_a_plain_non_negative_number(value: str, length: int | None) -> None:
    assert content_length({"Content-Length": value}) == length
    assert content_length({}) is None


def test_a_deadline_grows_with_the_bytes_and_none_without_a_rate() -> None:
    assert transfer_deadline(100.0, 30.0, 1024 * 1024, 256 * 1024) == 134.0
    assert transfer_deadline(100.0, 30.0, 0, 256 * 1024) == 130.0
    assert transfer_deadline(100.0, 30.0, 1 << 40, 0) == float("inf")
