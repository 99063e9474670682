"""The agent's client of the seeders (``p2p_mirror.core.protocol``): blob info, segment
offers (a torrent and the pieces dealt to this agent), and runs of dealt pieces.

Each blob is asked of its owning seeder (``SeederSet``); ``BlobSource`` keeps all of a
blob's requests on that seeder, and moves them to the next owner if it goes down."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

from p2p_mirror.agent.seeder_set import SeederSet
from p2p_mirror.core import protocol
from p2p_mirror.core.clusterauth import TOKEN_HEADER
from p2p_mirror.core.oci import Digest
from p2p_mirror.core.taken_body import TakenBody, take_body

log = logging.getLogger(__name__)
TORRENT_ATTEMPTS = 2  # a torrent request whose connection fails is sent again this often
CONNECT_TIMEOUT = 5.0  # a seeder that does not accept within this is down: ask the next


class Fallback(Exception):
    """The swarm path gave up; the reason is the message (used as a metric label too)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class SeederDown(Fallback):
    """The seeder did not answer: refused, timed out, cut the connection, or a 5xx."""

    def __init__(self, detail: str) -> None:
        super().__init__("seeder", detail)


@dataclass
class SegmentOffer:
    """A segment's torrent and the pieces the seeder dealt this agent; ``body`` is the open
    response the dealt pieces follow the torrent in, or None (a seeder that sends them only
    on request). Whoever holds the offer closes it."""

    torrent: bytes
    dealt: list[int]
    body: aiohttp.ClientResponse | None = None
    idle_timeout: float = 30.0  # a run whose seeder sends nothing this long is given up

    def close(self) -> None:
        if self.body is not None:
            self.body.close()

    def direct_run(self, size: int) -> TakenBody | None:
        """The dealt run's ``size`` bytes after the torrent taken off aiohttp (``take_body``:
        the response is closed with the offer, never reused); None where the body is not the
        plain bytes on a plain socket: read it with ``inline_run`` then."""
        assert self.body is not None
        return take_body(self.body, len(self.torrent), size, self.idle_timeout)

    def inline_pieces(self, sizes: list[int]) -> AsyncIterator[list[tuple[int, bytes]]]:
        """Batches of (piece, bytes) of the dealt run as it arrives after the torrent."""
        assert self.body is not None
        return read_pieces(self.body.content, self.dealt, sizes)

    def inline_run(self, size: int) -> AsyncIterator[bytes]:
        """The dealt run's ``size`` bytes after the torrent, a chunk as the connection
        delivered it at a time (no copy, no piece boundaries)."""
        assert self.body is not None
        return read_run(self.body.content, size)


class SeederClient:
    """Asks a blob's owning seeder for its segment torrents (the next owner if it is down)."""

    def __init__(self, seeders: SeederSet | list[str], timeout: float, token: str = "") -> None:
        self.seeders = seeders if isinstance(seeders, SeederSet) else SeederSet(seeders)
        self.timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=CONNECT_TIMEOUT)
        self.token = token  # the cluster's seeder-API token, on every request
        self._session: aiohttp.ClientSession | None = None
        self.requests: Counter[str] = Counter()  # sent, by kind; logged at close

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # Only the cluster token: a client's credentials never leave the node.
            headers = {TOKEN_HEADER: self.token} if self.token else None
            self._session = aiohttp.ClientSession(timeout=self.timeout, headers=headers)
        return self._session

    async def close(self) -> None:
        log.info("seeder requests: %s", dict(self.requests.most_common()))
        await self.seeders.close()
        if self._session is not None:
            await self._session.close()

    def source(self, digest: Digest, registry: str, name: str) -> BlobSource:
        return BlobSource(self, digest, registry, name)

    async def blob_info(
        self, digest: Digest, registry: str, name: str, skip: frozenset[str] = frozenset(),
    ) -> tuple[str, protocol.BlobInfo]:
        """(seeder URL, info) from the blob's owning seeder, or the next owner while they
        are down (refused, timed out, 5xx); ``skip``: seeders already given up for it.

        Any other answer of a seeder is final: another one would only fetch the blob from
        the origin once more and get the same answer. ``Fallback("seeder_refused")``: the
        origin refused the seeder's own credentials, and the agent fetches with its
        client's."""
        errors = []
        for url in await self.seeders.ranked(str(digest)):
            if url in skip:
                continue
            self.requests["blob_info"] += 1
            try:
                async with self.session.get(
                    url + protocol.blob_info_path(digest),
                    params=protocol.blob_info_query(registry, name),
                ) as resp:
                    if resp.status == 200:
                        info = protocol.BlobInfo.from_json(await resp.json())
                        self.seeders.mark_up(url)
                        return url, info
                    body = await resp.text()
                    detail = f"{url}: {resp.status} {body[:200]}"
                    if protocol.REFUSED_HEADER in resp.headers:
                        raise Fallback("seeder_refused", "; ".join([*errors, detail]))
                    if not _seeder_failed(resp.status, body):
                        raise Fallback("seeder", "; ".join([*errors, detail]))
                    errors.append(detail)
            except (aiohttp.ClientError, TimeoutError) as e:
                errors.append(f"{url}: {e or type(e).__name__}")
            except ValueError as e:
                raise Fallback("seeder", "; ".join([*errors, f"{url}: {e}"])) from None
            self.seeders.mark_down(url)
        raise SeederDown("; ".join(errors) or "no seeder left to ask")

    async def torrent(self, url: str, digest: Digest, index: int, bt_port: int) -> SegmentOffer:
        """Segment ``index``'s torrent, and the pieces this agent takes from the seeder (their
        bytes follow in the same response where the seeder does that).

        The seeder publishes a segment once its bytes arrived from the origin, which for a
        blob queued behind others can take minutes: wait as long as the seeder's origin
        downloads advance, and give up after ``timeout`` seconds in which they did not, or
        when ``TORRENT_ATTEMPTS`` requests in a row lost their connection.
        """
        loop = asyncio.get_running_loop()
        patience = self.timeout.total or 30.0
        progress, since = None, loop.time()
        failures = 0
        while True:
            self.requests["torrent"] += 1
            try:
                resp = await self.session.get(
                    url + protocol.torrent_path(digest, index),
                    params=protocol.torrent_query(bt_port, patience / 3),
                    # No bound on the whole response: the dealt run after the torrent goes
                    # at the pace of our download link, which can fall behind the seeder in
                    # a long pull; only a seeder silent this long is given up, and the
                    # segment then comes from its swarm.
                    timeout=aiohttp.ClientTimeout(
                        total=None, sock_connect=patience, sock_read=patience * 4 / 3),
                )
                if resp.status == 200:
                    return await _offer(resp, patience * 4 / 3)
                async with resp:
                    if resp.status != 202 and _seeder_failed(resp.status, await resp.text()):
                        raise SeederDown(f"torrent {index}: {resp.status}")
                    if resp.status != 202:
                        raise Fallback("seeder", f"torrent {index}: {resp.status}")
                    now = protocol.parse_not_yet(await resp.json())
            except (aiohttp.ClientError, asyncio.IncompleteReadError, TimeoutError) as e:
                # One lost connection is no dead seeder: on busy links a few TCP connections
                # stall or time out, and giving up here costs the rest of the blob from the
                # origin. Ask again (on another connection).
                failures += 1
                error = f"torrent {index}: {e or type(e).__name__}"
                if failures >= TORRENT_ATTEMPTS:
                    raise SeederDown(error) from None
                log.warning("blob %s: %s; asking again", digest, error)
                continue
            except ValueError as e:
                raise Fallback("seeder", f"torrent {index}: {e}") from None
            failures = 0
            if now != progress:
                progress, since = now, loop.time()
            elif loop.time() - since >= patience:
                raise Fallback("seeder", f"torrent {index}: no origin progress for {patience:g}s")

    async def pieces(
        self, url: str, digest: Digest, index: int, first: int, sizes: list[int]
    ) -> AsyncIterator[list[tuple[int, bytes]]]:
        """Batches of (piece, bytes) of a run of consecutive pieces the seeder dealt to this
        agent, as they arrive (``sizes``: each piece's length)."""
        self.requests["pieces"] += 1
        async with self.session.get(
            url + protocol.pieces_path(digest, index, first),
            params=protocol.pieces_query(len(sizes)),
        ) as resp:
            if resp.status != 200:
                raise Fallback("seeder", f"pieces {first}+{len(sizes)} of {index}: {resp.status}")
            pieces = list(range(first, first + len(sizes)))
            async for batch in read_pieces(resp.content, pieces, sizes):
                yield batch


class BlobSource:
    """The seeder one blob's requests go to: its owner while it answers, then the next one
    in rendezvous order (which fetches the blob from the origin in turn). Segments are the
    same torrents on every seeder, so a blob can change seeders half way."""

    def __init__(self, client: SeederClient, digest: Digest, registry: str, name: str) -> None:
        self.client, self.digest = client, digest
        self.registry, self.name = registry, name
        self.url: str | None = None
        self.info: protocol.BlobInfo | None = None
        self.peers: list[tuple[str, int]] = []  # the current seeder's BitTorrent address
        self._given_up: set[str] = set()
        self._switch = asyncio.Lock()

    async def open(self) -> tuple[str, protocol.BlobInfo]:
        """(URL, info) of the seeder serving this blob now (asked for the blob if new)."""
        async with self._switch:
            if self.url is None or self.info is None:
                url, info = await self.client.blob_info(
                    self.digest, self.registry, self.name, frozenset(self._given_up))
                first = self.info
                if first is not None and (info.size, info.segment_size) != (
                        first.size, first.segment_size):  # fmt: skip
                    raise Fallback("seeder", f"{url} disagrees on the blob's layout: {info}")
                host = info.bt_host or urlsplit(url).hostname or ""
                self.peers = [(await _resolve(host), info.bt_port)]
                self.url, self.info = url, info
            return self.url, self.info

    async def failed(self, url: str) -> None:
        """``url`` stopped answering for this blob: the next request goes to the next owner."""
        self.client.seeders.mark_down(url)
        async with self._switch:
            self._given_up.add(url)
            if self.url == url:
                self.url = None

    async def torrent(self, index: int, bt_port: int) -> tuple[str, SegmentOffer]:
        """(seeder URL, offer) for segment ``index``, from the next seeder if one is down."""
        while True:
            url, _ = await self.open()  # Fallback once no seeder is left
            try:
                return url, await self.client.torrent(url, self.digest, index, bt_port)
            except SeederDown as e:
                log.warning("blob %s: seeder %s down (%s); asking the next one",
                            self.digest, url, e)  # fmt: skip
                await self.failed(url)


def _seeder_failed(status: int, body: str) -> bool:
    """A 5xx that is no answer of the seeder's own (its answers carry OCI errors): the
    seeder crashed, or a proxy in front of it found it gone. A seeder that says the origin
    failed is final: the next seeder would ask the same origin."""
    if status < 500:
        return False
    try:
        data = json.loads(body)
    except ValueError:
        return True
    return not (isinstance(data, dict) and isinstance(data.get("errors"), list))


async def _resolve(host: str) -> str:
    """An IP literal for libtorrent's connect_peer (seeder URLs may name a host)."""
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(host))
    infos = await asyncio.get_running_loop().getaddrinfo(host, None)
    return str(infos[0][4][0])


async def _offer(resp: aiohttp.ClientResponse, idle_timeout: float = 30.0) -> SegmentOffer:
    """Read a 200 torrent response up to its dealt pieces; the offer keeps it open for them."""
    try:
        dealt, length = protocol.parse_offer_headers(resp.headers)
    except protocol.ProtocolError:
        resp.close()
        raise
    if length is None:  # a seeder that sends the pieces only on request
        async with resp:
            return SegmentOffer(await resp.read(), dealt)
    try:
        return SegmentOffer(await resp.content.readexactly(length), dealt, resp, idle_timeout)
    except BaseException:  # a cut body: a seeder failure
        resp.close()
        raise


async def _next_chunk(content: aiohttp.StreamReader) -> bytes:
    """The next chunk the connection delivered; empty only at the body's end (a chunked
    body's chunk boundary reads as an empty chunk too, and is skipped)."""
    while True:
        chunk, end_of_http_chunk = await content.readchunk()
        if chunk or not end_of_http_chunk:
            return chunk


async def read_pieces(
    content: aiohttp.StreamReader, pieces: list[int], sizes: list[int]
) -> AsyncIterator[list[tuple[int, bytes]]]:
    """Every whole piece of a run received so far, a batch per chunk the connection
    delivered (so a piece is not held back waiting for the next ones). Each piece costs
    one copy (none when it is a chunk as received), as with ``readexactly``, but no await
    of its own. A body that ends early raises ``asyncio.IncompleteReadError`` after the
    whole pieces before the cut."""
    parts: list[memoryview] = []  # received, not yet in a piece (less than the next piece)
    have = i = 0
    while i < len(pieces):
        chunk = await _next_chunk(content)
        if not chunk:
            raise asyncio.IncompleteReadError(b"".join(parts), sizes[i])
        parts.append(memoryview(chunk))
        have += len(chunk)
        batch = []
        while i < len(pieces) and have >= sizes[i]:
            batch.append((pieces[i], _take(parts, sizes[i])))
            have -= sizes[i]
            i += 1
        if batch:
            yield batch


async def read_run(content: aiohttp.StreamReader, size: int) -> AsyncIterator[bytes]:
    """``size`` bytes of ``content`` in the chunks the connection delivered; a body that ends
    early raises ``asyncio.IncompleteReadError`` after the chunks before the cut."""
    left = size
    while left:
        chunk = await _next_chunk(content)
        if not chunk:
            raise asyncio.IncompleteReadError(b"", left)
        if len(chunk) > left:
            chunk = chunk[:left]
        left -= len(chunk)
        yield chunk


def _take(parts: list[memoryview], size: int) -> bytes:
    """The first ``size`` bytes of ``parts`` (which hold at least that), removed from it."""
    first = parts[0]
    if len(first) == size and isinstance(first.obj, bytes) and len(first.obj) == size:
        parts.pop(0)
        return first.obj  # a whole chunk: no copy
    if len(first) >= size:
        parts[0] = first[size:]
        return bytes(first[:size])
    taken, need = [], size
    while need:
        part = parts[0]
        if len(part) <= need:
            taken.append(parts.pop(0))
            need -= len(part)
        else:
            taken.append(part[:need])
            parts[0] = part[need:]
            need = 0
    return b"".join(taken)


def runs_of(pieces: list[int]) -> list[list[int]]:
    """[0, 1, 2, 5, 6] -> [[0, 1, 2], [5, 6]]: one request per run of consecutive pieces."""
    runs: list[list[int]] = []
    for piece in sorted(set(pieces)):
        if runs and runs[-1][-1] == piece - 1:
            runs[-1].append(piece)
        else:
            runs.append([piece])
    return runs
