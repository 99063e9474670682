"""The agent's seeder set: names expand to their addresses (a fake resolver: no DNS in
tests), the owner of a blob is the same whatever the configured order, a member that failed
goes last for a while, and a failing resolver keeps the addresses known before."""

from __future__ import annotations

import asyncio

import pytest

from p2p_mirror.agent.seeder_set import MAX_ADDRESSES, SeederSet, member_key
from p2p_mirror.core.rendezvous import rank

DIGESTS = [f"sha256:{i:064x}" for i in range(200)]


class FakeResolver:
    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, int]] = []
        self.fail = False

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append((host, port))
        if self.fail:
            raise OSError("temporary failure in name resolution")
        return list(self.answers[host])


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_owner_is_the_same_for_any_configured_order() -> None:
    urls = ["http://198.18.0.2:5005", "http://198.18.0.3:5005", "http://[2001:db8::4]:5005"]

    async def main() -> None:
        a, b = SeederSet(urls), SeederSet(list(reversed(urls)))
        owners = set()
        for digest in DIGESTS:
            first = (await a.ranked(digest))[0]
            assert first == (await b.ranked(digest))[0]
            owners.add(first)
        assert owners == set(urls)  # every seeder owns some blobs

    asyncio.run(main())
    assert member_key("http://[2001:db8::4]:5005") == "[2001:db8::4]:5005"
    assert member_key("https://198.18.0.2") == "198.18.0.2:443"


def test_a_name_stands_for_all_its_addresses_and_is_resolved_again_when_due() -> None:
    resolver = FakeResolver({"seeders.p2p.svc": ["198.18.0.7", "198.18.0.5", "2001:db8::9"]})
    clock = Clock()
    seeders = SeederSet(["http://seeders.p2p.svc:5005/x"], resolver, refresh=30, clock=clock)

    async def main() -> None:
        order = await seeders.ranked(DIGESTS[0])
        assert sorted(order) == ["http://198.18.0.5:5005/x", "http://198.18.0.7:5005/x",
                                 "http://[2001:db8::9]:5005/x"]  # fmt: skip
        assert resolver.calls == [("seeders.p2p.svc", 5005)]
        await seeders.ranked(DIGESTS[1])
        assert len(resolver.calls) == 1  # not due yet
        # A replica left the Service and one joined: the set follows once due.
        resolver.answers["seeders.p2p.svc"] = ["198.18.0.5", "198.18.0.8"]
        clock.now += 31
        await seeders.ranked(DIGESTS[0])  # starts the refresh in the background
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert sorted(seeders.members) == ["http://198.18.0.5:5005/x", "http://198.18.0.8:5005/x"]
        # The resolver fails: the known addresses stay.
        resolver.fail = True
        clock.now += 31
        await seeders.ranked(DIGESTS[0])
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert len(resolver.calls) == 3
        assert sorted(seeders.members) == ["http://198.18.0.5:5005/x", "http://198.18.0.8:5005/x"]
        await seeders.close()

    asyncio.run(main())


def test_a_name_never_resolved_is_asked_as_it_is_and_addresses_are_bounded() -> None:
    failing = FakeResolver({})
    failing.fail = True
    many = FakeResolver({"big": [f"198.18.{i // 250}.{i % 250 + 1}" for i in range(500)]})

    async def main() -> None:
        alone = SeederSet(["http://seeder.example:5005"], failing)
        assert await alone.ranked(DIGESTS[0]) == ["http://seeder.example:5005"]
        big = SeederSet(["http://big:5005"], many)
        assert len(await big.ranked(DIGESTS[0])) == MAX_ADDRESSES

    asyncio.run(main())


@pytest.mark.parametrize("members", [3, 5])
def test_a_member_marked_down_goes_last_until_its_time_is_up(members: int) -> None:
    urls = [f"http://198.18.0.{i}:5005" for i in range(2, 2 + members)]
    clock = Clock()
    seeders = SeederSet(urls, down_for=30, clock=clock)

    async def main() -> None:
        digest = DIGESTS[3]
        before = await seeders.ranked(digest)
        assert before == [u for k in rank([member_key(u) for u in urls], digest)
                          for u in urls if member_key(u) == k]  # fmt: skip
        seeders.mark_down(before[0])
        assert await seeders.ranked(digest) == [*before[1:], before[0]]
        # Every blob now asks the down seeder last.
        for other in DIGESTS:
            order = await seeders.ranked(other)
            if order[-1] != before[0]:
                pytest.fail(f"{other}: a down seeder was not moved last")
        clock.now += 31
        assert await seeders.ranked(digest) == before

    asyncio.run(main())
