"""Rendezvous hashing: stable, balanced, and moving only the keys of a member that left."""

from __future__ import annotations

import random
from collections import Counter

from p2p_mirror.core.rendezvous import owners, rank

MEMBERS = [f"198.18.0.{i}:5005" for i in range(2, 7)]
KEYS = [f"sha256:{random.Random(i).getrandbits(256):064x}" for i in range(5000)]


def test_the_order_depends_on_the_members_not_on_the_list_order() -> None:
    shuffled = list(reversed(MEMBERS))
    for key in KEYS[:200]:
        assert rank(MEMBERS, key) == rank(shuffled, key) == rank([*MEMBERS, MEMBERS[0]], key)
        assert sorted(rank(MEMBERS, key)) == sorted(MEMBERS)


def test_owners_are_spread_evenly() -> None:
    load = Counter(rank(MEMBERS, key)[0] for key in KEYS)
    assert set(load) == set(MEMBERS)
    expected = len(KEYS) / len(MEMBERS)  # 1000 each; binomial sd ~28
    assert all(abs(n - expected) < 0.1 * expected for n in load.values()), load


def test_a_member_leaving_moves_only_its_own_keys_to_their_next_owner() -> None:
    gone = MEMBERS[2]
    rest = [m for m in MEMBERS if m != gone]
    moved = 0
    for key in KEYS:
        before, after = rank(MEMBERS, key), rank(rest, key)
        if before[0] == gone:
            moved += 1
            assert after[0] == before[1]  # the standby takes over
        else:
            assert after[0] == before[0]  # everyone else keeps what it owned
    assert 0.15 * len(KEYS) < moved < 0.25 * len(KEYS)  # about 1/5


def test_a_member_joining_takes_about_its_share_from_the_others() -> None:
    new = "198.18.0.9:5005"
    taken = sum(rank([*MEMBERS, new], key)[0] != rank(MEMBERS, key)[0] for key in KEYS)
    assert all(rank([*MEMBERS, new], k)[0] in (new, rank(MEMBERS, k)[0]) for k in KEYS)
    assert 0.12 * len(KEYS) < taken < 0.22 * len(KEYS)  # about 1/6


def test_owners_picks_two_distinct_members_and_copes_with_small_sets() -> None:
    pairs = Counter(tuple(owners(MEMBERS, key, 2)) for key in KEYS)
    assert all(len(set(p)) == 2 for p in pairs)
    assert len(pairs) == 20  # every ordered pair of 5 members occurs
    assert owners(["a"], "k", 2) == ["a"] and owners([], "k", 2) == []
