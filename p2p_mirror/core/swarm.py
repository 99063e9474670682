"""The only module that touches libtorrent: a session with a small asyncio interface.

A ``TorrentSession`` seeds and downloads single-file torrents. Callers wait for pieces with
``Transfer.wait_piece`` (driven by libtorrent's alerts, so a finished piece wakes the
reader at once) and read the bytes from the file themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import mmap
import os
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import libtorrent as lt

from p2p_mirror.core.config import HostPort, MiB

log = logging.getLogger(__name__)
# Runs up to this size are read and checked against their pieces' hashes before any flush;
# larger ones wait for libtorrent's flush instead (a flush per trickled piece cost more).
VERIFY_MAX = 512 * 1024
# Each peer connection's kernel receive buffer (the kernel doubles it), and so the most
# libtorrent reads from one peer at a time.
RECV_SOCKET_BUFFER = 512 * 1024
# What libtorrent's bindings raise: RuntimeError (e.g. a handle of a removed torrent),
# TypeError or ValueError (arguments it cannot convert).
LIBTORRENT_ERRORS = (RuntimeError, TypeError, ValueError)


@dataclass(frozen=True)
class SessionTotals:
    """Payload byte counters of a session; ``wasted`` = received twice or failing a hash."""

    downloaded: int
    uploaded: int
    wasted: int


class SwarmError(RuntimeError):
    """The torrent failed (disk error, bad metainfo): the caller falls back to the origin."""


@dataclass(frozen=True)
class Metainfo:
    """A parsed torrent: its bytes (to hand to peers) and what readers need to know."""

    data: bytes
    info_hash: str
    name: str
    size: int
    piece_length: int
    num_pieces: int
    piece_hashes: tuple[bytes, ...]

    @classmethod
    def parse(cls, data: bytes) -> Metainfo:
        try:
            ti = lt.torrent_info(lt.bdecode(data))
        except LIBTORRENT_ERRORS as e:
            raise SwarmError(f"invalid torrent: {e}") from None
        if ti.num_files() != 1:
            raise SwarmError("torrent must hold exactly one file")
        return cls(
            data=data,
            info_hash=str(ti.info_hashes().v1),
            name=ti.name(),
            size=ti.total_size(),
            piece_length=ti.piece_length(),
            num_pieces=ti.num_pieces(),
            piece_hashes=tuple(ti.hash_for_piece(i) for i in range(ti.num_pieces())),
        )

    def piece_range(self, piece: int) -> tuple[int, int]:
        """File bytes [start, end) of ``piece``."""
        start = piece * self.piece_length
        return start, min(start + self.piece_length, self.size)

    def piece_ok(self, piece: int, data: bytes) -> bool:
        return hashlib.sha1(data).digest() == self.piece_hashes[piece]


def make_torrent(
    path: Path, trackers: Iterable[str], piece_size: int, hashes: list[bytes] | None = None
) -> bytes:
    """A private v1 torrent of one file; the info-hash depends only on name, size, piece size,
    bytes (not on the trackers, so a tracker token in their URLs changes nothing).

    ``hashes``: each piece's SHA-1 if the caller computed them already (else read the file).
    """
    entry = lt.create_file_entry(path.name, path.stat().st_size)
    ct = lt.create_torrent([entry], piece_size, lt.create_torrent.v1_only)
    ct.set_priv(True)  # no DHT, PEX or LSD for it, whatever a peer's settings say
    for tier, url in enumerate(trackers):
        ct.add_tracker(url, tier)
    ct.set_creator("p2p-mirror")
    if hashes is None:
        lt.set_piece_hashes(ct, str(path.parent))
    elif len(hashes) != ct.num_pieces():
        raise SwarmError(f"{len(hashes)} piece hashes for {ct.num_pieces()} pieces of {path}")
    else:
        for piece, digest in enumerate(hashes):
            ct.set_hash(piece, digest)
    return lt.bencode(ct.generate())


def set_trackers(torrent: bytes, trackers: Sequence[str]) -> bytes:
    """``torrent`` announcing to ``trackers``, one tier each (libtorrent, with
    ``announce_to_all_tiers``, announces to every tier). The announce list is outside the
    info dict: the info-hash stays the same."""
    data = lt.bdecode(torrent)
    if not isinstance(data, dict) or b"info" not in data:
        raise SwarmError("invalid torrent: no info dict")
    data.pop(b"announce", None)
    data.pop(b"announce-list", None)
    if trackers:
        data[b"announce"] = trackers[0].encode()
        data[b"announce-list"] = [[url.encode()] for url in trackers]
    return lt.bencode(data)


@dataclass
class Transfer:
    """One torrent in the session, seeding or downloading into ``save_dir``."""

    meta: Metainfo
    handle: lt.torrent_handle
    save_dir: Path
    done: set[int] = field(default_factory=set)
    error: str | None = None
    checked: asyncio.Event = field(default_factory=asyncio.Event)  # libtorrent's own check done
    failed: set[int] = field(default_factory=set)  # pieces that failed libtorrent's hash check
    on_disk: set[int] = field(default_factory=set)  # finished before a completed flush
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    # flush_cache requests in the order libtorrent completes them (each is a fence on the
    # torrent's storage): the pieces finished when it was asked, and who waits for it
    _flushes: deque[tuple[frozenset[int], asyncio.Future[None]]] = field(default_factory=deque)

    @property
    def path(self) -> Path:
        return self.save_dir / self.meta.name

    @property
    def complete(self) -> bool:
        return len(self.done) == self.meta.num_pieces

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_piece(self, piece: int, timeout: float) -> bool:
        """True once ``piece`` is downloaded and verified; False after ``timeout`` in which
        no piece of this torrent finished (rarest-first may leave a given piece for last, so
        only a torrent that stopped moving counts as stalled)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while piece not in self.done:
            if self.error:
                raise SwarmError(self.error)
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a cancellation
            # that meets a finished piece, and the cancelled fetch would wait on.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._changed.wait()
                deadline = loop.time() + timeout  # some piece finished: still moving
        return True

    async def verdict(self, piece: int, timeout: float) -> bool:
        """True once libtorrent verified ``piece``, False once it failed its hash check (and
        was discarded); TimeoutError if neither happened within ``timeout``."""
        async with asyncio.timeout(timeout):
            while piece not in self.done:
                if piece in self.failed:
                    return False
                if self.error:
                    raise SwarmError(self.error)
                await self._changed.wait()
        return True

    def payload_received(self) -> int:
        """Payload bytes downloaded from peers so far (0 if libtorrent cannot say)."""
        with contextlib.suppress(*LIBTORRENT_ERRORS):
            return self.handle.status().total_payload_download
        return 0

    async def add_piece(self, piece: int, data: bytes, timeout: float = 10.0) -> None:
        """Hand libtorrent a piece fetched some other way (``add_pieces``)."""
        await self.add_pieces([(piece, data)], timeout)

    async def add_pieces(self, pieces: list[tuple[int, bytes]], timeout: float = 10.0) -> None:
        """Hand libtorrent (piece, bytes) fetched some other way; it checks each hash, then
        shares the piece (``verdict`` says how that check went). The binding takes ``bytes``
        only (not a ``memoryview``) and copies them.

        Not before libtorrent has checked the new torrent's files: a piece added during that
        check is silently lost (2 of 30 fresh torrents, pieces added at once), and nobody
        else has a piece the seeder dealt only to us. TimeoutError if the check never ends.
        """
        if not self.checked.is_set():
            async with asyncio.timeout(timeout):
                await self.checked.wait()
        add = self.handle.add_piece
        for piece, data in pieces:
            add(piece, data, 0)

    def connect(self, peers: Iterable[tuple[str, int]]) -> None:
        for host, port in peers:
            with contextlib.suppress(*LIBTORRENT_ERRORS):
                self.handle.connect_peer((host, port))

    async def read_pieces(self, first: int, stop: int, timeout: float = 5.0) -> memoryview:
        """The bytes of finished pieces ``first`` to ``stop - 1``, mapped from the file (one
        thread hand-off per run, not per piece; no copy).

        libtorrent reports a piece finished once hashed, possibly before its blocks reached
        the file: read only after a flush asked for once the pieces had finished has
        completed (a fence behind every write queued before it), so the file holds the bytes
        libtorrent verified, and re-read (after another flush) while the read comes up short.
        A short run is first read and checked against its pieces' hashes, which is cheaper.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        start, end = self.meta.piece_range(first)[0], self.meta.piece_range(stop - 1)[1]
        if end - start <= VERIFY_MAX and not self.on_disk.issuperset(range(first, stop)):
            # a short run (pieces trickling in from peers): hashing it costs less than a flush
            data = await asyncio.to_thread(self._read_verified, first, stop, start, end)
            if data is not None:
                return memoryview(data)
        while True:
            await self._flushed(first, stop, deadline)
            data = await asyncio.to_thread(map_range, self.path, start, end)
            if data is not None:
                return data
            self.on_disk.difference_update(range(first, stop))  # the next read needs a flush
            if loop.time() > deadline:
                raise self._never_on_disk(first, stop)
            await asyncio.sleep(0.005)

    def _read_verified(self, first: int, stop: int, start: int, end: int) -> bytes | None:
        """The pieces' bytes from the file if all of them match their hashes (blocking)."""
        try:
            data = read_range(self.path, start, end)
        except FileNotFoundError:
            return None
        view = memoryview(data)
        for piece in range(first, stop):
            lo, hi = self.meta.piece_range(piece)
            if not self.meta.piece_ok(piece, view[lo - start : hi - start]):
                return None
        return data

    async def _flushed(self, first: int, stop: int, deadline: float) -> None:
        """Return once pieces ``first`` to ``stop - 1`` are known to be in the file."""
        wanted = range(first, stop)
        while not self.on_disk.issuperset(wanted):
            if self.error:
                raise SwarmError(self.error)
            if not self.done.issuperset(wanted):
                raise SwarmError(f"pieces {first}-{stop - 1} of {self.meta.name} not finished")
            pending = next((f for snap, f in self._flushes if snap.issuperset(wanted)), None)
            if pending is None:
                pending = asyncio.get_running_loop().create_future()
                self._flushes.append((frozenset(self.done), pending))
                try:
                    self.handle.flush_cache()
                except LIBTORRENT_ERRORS as e:
                    self._flushes.pop()
                    raise SwarmError(f"cannot flush {self.meta.name}: {e}") from None
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                # shield: another reader may wait for the same flush
                await asyncio.wait_for(asyncio.shield(pending), max(remaining, 0))
            except TimeoutError:
                raise self._never_on_disk(first, stop) from None

    def _cache_flushed(self) -> None:
        """libtorrent completed the oldest flush request still waiting (or all, on removal)."""
        if self._flushes:
            snapshot, waiter = self._flushes.popleft()
            self.on_disk |= snapshot
            if not waiter.done():
                waiter.set_result(None)

    def _never_on_disk(self, first: int, stop: int) -> SwarmError:
        return SwarmError(f"pieces {first}-{stop - 1} of {self.meta.name} never reached the disk")

    def peer_summary(self) -> str:
        """``ip:port down/up`` per connected peer, for the logs."""
        parts = []
        with contextlib.suppress(*LIBTORRENT_ERRORS):
            for peer in self.handle.get_peer_info():
                ip, port = peer.ip
                parts.append(f"{ip}:{port} {peer.total_download}/{peer.total_upload}")
        return ", ".join(parts) or "no peers"


class TorrentSession:
    """A libtorrent session tuned for a LAN swarm of registry blobs (TCP only, no DHT)."""

    def __init__(
        self,
        listen: HostPort,
        upload_rate_limit: int = 0,
        download_rate_limit: int = 0,
        unchoke_slots: int = 64,
        tracker_peers: int = 200,
        announce_ip: str | None = None,
    ) -> None:
        self.listen = listen
        self.session = lt.session(
            {
                "listen_interfaces": str(listen),
                "enable_dht": False,
                "enable_lsd": False,
                "enable_upnp": False,
                "enable_natpmp": False,
                "enable_outgoing_utp": False,
                "enable_incoming_utp": False,
                "allow_multiple_connections_per_ip": True,
                "alert_mask": (
                    lt.alert_category.status
                    | lt.alert_category.error
                    | lt.alert_category.piece_progress
                    | lt.alert_category.storage
                ),
                "tick_interval": 100,
                # One disk I/O thread, not 10: each disk job woke one of ten idle threads
                # (half of an agent's context switches in a cluster pull); a blob's writes
                # and reads are page-cache copies one thread keeps up with.
                "aio_threads": 1,
                "send_socket_buffer_size": 4 * MiB,
                # libtorrent drains whatever a peer's socket holds into that peer's receive
                # buffer (max_peer_recv_buffer_size does not cap it), and hands every block
                # on to the disk queue past max_queued_disk_bytes: the socket buffer bounds
                # both, per peer. 512 KiB still holds many round trips of a LAN link.
                "recv_socket_buffer_size": RECV_SOCKET_BUFFER,
                # Blocks received and not yet written (libtorrent 2.1 allows 100 MiB): with
                # each peer's overshoot bounded as above, this bounds the queue.
                "max_queued_disk_bytes": 4 * MiB,
                "send_buffer_watermark": 4 * MiB,
                "upload_rate_limit": upload_rate_limit,
                "download_rate_limit": download_rate_limit,
                "active_downloads": -1,
                "active_seeds": -1,
                "active_limit": -1,
                "active_checking": 8,
                "unchoke_slots_limit": unchoke_slots,
                # Queue ~1 s of requests per peer, not 3: requests queued at the seeder for
                # pieces another node is about to have are duplicates.
                "request_queue_time": 1,
                "connections_limit": 1000,
                # libtorrent drops a peer that turns seed while we are not interested in it,
                # before the HAVE that made it a seed makes us interested again: the piece it
                # just completed then waits for a reconnect. Keep such connections; idle
                # ones are closed once the connection limit is reached, after this many seconds.
                "close_redundant_connections": False,
                "inactivity_timeout": 10,
                "torrent_connect_boost": 50,
                "connection_speed": 200,
                "min_reconnect_time": 1,
                # libtorrent's default (300 s) overrides the tracker's interval; peers would
                # expire from our tracker between announces.
                "min_announce_interval": 10,
                "stop_tracker_timeout": 1,
                # A pull joins dozens of segment torrents at once; libtorrent's 50 would
                # queue the rest, leaving them without peers for seconds.
                "max_concurrent_http_announces": 1000,
                "announce_to_all_trackers": True,
                "announce_to_all_tiers": True,
                "num_want": tracker_peers,
                "user_agent": "p2p-mirror",
            },
            # No default plugins: ut_metadata would hand a torrent to anyone who knows its
            # info-hash, ut_pex would tell peers about others (docs/security.md, rule 5).
            0,
        )
        self.session.add_extension("smart_ban")  # the one default worth keeping
        if announce_ip:
            # Trackers record this (ip=), not the source address a NAT may have rewritten.
            self.session.apply_settings({"announce_ip": announce_ip})
        if upload_rate_limit or download_rate_limit:
            self._limit_local_peers()
        self.transfers: dict[str, Transfer] = {}
        self.hash_failures = 0
        # events of this session, logged at close (what a pull costs per event)
        self.alert_counts: Counter[str] = Counter()
        self.alert_pops = 0
        self.torrents_added = 0
        self._wake_fds: tuple[int, int] | None = None  # (read, write) of the alert pipe

    def _limit_local_peers(self) -> None:
        """Apply the rate limits to LAN peers too (libtorrent exempts them by default).

        A cluster's peers are all on the local network, and the limits exist to protect it.
        """
        everyone = lt.ip_filter()
        global_class = 1 << lt.session.global_peer_class_id
        everyone.add_rule("0.0.0.0", "255.255.255.255", global_class)
        everyone.add_rule("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", global_class)
        self.session.set_peer_class_filter(everyone)

    @property
    def port(self) -> int:
        return self.session.listen_port()

    async def start(self) -> None:
        # libtorrent writes a byte to this pipe from its own thread (in C++, without the
        # GIL) when the alert queue turns non-empty; the event loop pops the queue then.
        read, write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_fds = (read, write)
        self.session.set_alert_fd(write)
        asyncio.get_running_loop().add_reader(read, self._alerts_ready)
        self._alerts_ready()  # alerts queued before the pipe was set never write to it

    async def close(self) -> None:
        fds, self._wake_fds = self._wake_fds, None
        if fds is not None:
            asyncio.get_running_loop().remove_reader(fds[0])
        # libtorrent writes to the pipe under its alert lock whenever the alert queue turns
        # non-empty (wait_for_alert returns only after that). Nothing pops alerts from here
        # on, so with one alert left queued it never writes again and the pipe can close.
        self.session.post_session_stats()
        await asyncio.to_thread(self.session.wait_for_alert, 1000)
        for fd in fds or ():
            os.close(fd)
        for transfer in list(self.transfers.values()):
            self.remove(transfer)
        self.session.pause()
        log.info("swarm events: %d torrents added, %d alert pops, alerts %s",
                 self.torrents_added, self.alert_pops, dict(self.alert_counts.most_common()))

    def get(self, info_hash: str) -> Transfer | None:
        return self.transfers.get(info_hash)

    def add(
        self,
        meta: Metainfo,
        save_dir: Path,
        seed: bool,
        peers: Iterable[tuple[str, int]] = (),
        announce: bool = True,
        checked: bool = False,
    ) -> Transfer:
        """Seed a verified file or download it; reuse a known torrent.

        A seed's file is not checked at once: libtorrent checks each piece the first time
        a peer asks for it, unless ``checked`` says the caller already checked every piece
        of this file against the torrent.

        Downloads use rarest-first, not sequential order: when every node pulls the same
        blob at once, sequential peers all hold the same pieces and only the seeder has
        anything to give.
        Peers are found through the tracker only (no DHT, LSD or peer exchange), so a torrent
        added with ``announce=False`` stays unknown to peers that were not told about it.
        """
        existing = self.transfers.get(meta.info_hash)
        if existing and existing.save_dir == save_dir and not existing.error:
            existing.connect(peers)
            return existing
        if existing:
            self.remove(existing)
        atp = lt.add_torrent_params()
        atp.ti = lt.torrent_info(lt.bdecode(meta.data))
        atp.save_path = str(save_dir)
        flags = lt.torrent_flags.disable_dht | lt.torrent_flags.disable_lsd
        flags |= lt.torrent_flags.disable_pex
        if seed:
            flags |= lt.torrent_flags.seed_mode
            if checked:
                atp.verified_pieces = [True] * meta.num_pieces
        if not announce:
            atp.trackers = []
            flags |= lt.torrent_flags.override_trackers
        atp.flags = flags
        handle = self.session.add_torrent(atp)
        self.torrents_added += 1
        transfer = Transfer(meta, handle, save_dir)
        if seed:
            transfer.done = set(range(meta.num_pieces))
            transfer.on_disk = set(transfer.done)
        self.transfers[meta.info_hash] = transfer
        transfer.connect(peers)
        return transfer

    def remove(self, transfer: Transfer) -> None:
        """Stop sharing a torrent; its file stays on disk."""
        if self.transfers.get(transfer.meta.info_hash) is transfer:
            del self.transfers[transfer.meta.info_hash]
        with contextlib.suppress(*LIBTORRENT_ERRORS):
            self.session.remove_torrent(transfer.handle)
        transfer.error = transfer.error or "removed"
        transfer._notify()
        for _, waiter in transfer._flushes:  # no alert will come: wake readers to see the error
            if not waiter.done():
                waiter.set_result(None)
        transfer._flushes.clear()

    def totals(self) -> SessionTotals:
        """Payload bytes over all torrents in the session."""
        down = up = wasted = 0
        for transfer in list(self.transfers.values()):
            with contextlib.suppress(*LIBTORRENT_ERRORS):
                status = transfer.handle.status()
                down += status.total_payload_download
                up += status.total_payload_upload
                wasted += status.total_redundant_bytes + status.total_failed_bytes
        return SessionTotals(down, up, wasted)

    def _alerts_ready(self) -> None:
        """Empty the pipe, then the alert queue (in this order: an alert queued after the pop
        writes again, and the loop calls back)."""
        if self._wake_fds is None:
            return
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_fds[0], 4096):
                pass
        alerts = self.session.pop_alerts()
        self.alert_pops += 1
        counts = self.alert_counts
        for alert in alerts:
            counts[type(alert).__name__] += 1
            self._dispatch(alert)

    def _dispatch(self, alert: lt.alert) -> None:
        if isinstance(alert, lt.hash_failed_alert):
            self.hash_failures += 1
            log.warning("piece %d failed its hash check (corrupt or lying peer)", alert.piece_index)
        handle = getattr(alert, "handle", None)
        if handle is None:
            return
        try:
            info_hash = str(handle.info_hashes().v1)
        except LIBTORRENT_ERRORS:  # a handle of a torrent already removed
            return
        transfer = self.transfers.get(info_hash)
        if transfer is None:
            return
        if isinstance(alert, lt.piece_finished_alert):
            transfer.done.add(alert.piece_index)
            transfer._notify()
        elif isinstance(alert, lt.hash_failed_alert):
            transfer.failed.add(alert.piece_index)
            transfer._notify()
        elif isinstance(alert, lt.cache_flushed_alert):
            transfer._cache_flushed()
        elif isinstance(alert, lt.torrent_checked_alert):
            transfer.checked.set()
        elif isinstance(alert, (lt.torrent_error_alert, lt.file_error_alert)):
            transfer.error = alert.message()
            log.error("torrent %s: %s", transfer.meta.name, transfer.error)
            transfer._notify()


def map_range(path: Path, start: int, end: int) -> memoryview | None:
    """Bytes [start, end) of a file, mapped read-only and paged in at once (blocking); None
    if the file is not there or shorter. ``start`` must be a multiple of the page size (a
    piece's offset is). Segment files are never truncated, which a mapping would not survive.
    """
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size < end:
                return None
            if end == start:
                return memoryview(b"")
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            mapped = mmap.mmap(f.fileno(), end - start, flags=flags, prot=mmap.PROT_READ,
                               offset=start)  # fmt: skip
    except FileNotFoundError:
        return None
    return memoryview(mapped)


def read_range(path: Path, start: int, end: int) -> bytes:
    """Bytes [start, end) of a file (fewer if it is shorter)."""
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start)
