"""The block store: SurfStore's content-addressed blocks, on disk.

Blocks are immutable and named by their SHA-256, so storing one is
idempotent and needs no coordination: a block store is not replicated by
Raft. Clients place each block on several stores (``surfshard.blocks.ring``)
and read another copy when one is missing or bad. Blocks are appended to
pack files (``BlockStore``) and fsynced before they are acknowledged, so a
crash leaves each block whole or absent; a block whose caller names its
hash is checked against it before it is stored; a block read back is
checked against its name, so silent disk corruption is reported, never
served.

The service runs every disk operation in the reactor's thread pool: file
reads, writes and fsyncs never stall the event loop. Batch calls
(``putblocks``, ``getblocks``) carry many blocks per request.

Blocks no file refers to any more (old versions, deleted files) are
collected by ``surfshard blocks gc`` (``client.blocks.BlockClient.collect``):
it lists every file of every shard and asks each store to drop the blocks
none of them names (``gcsweep``), then to rewrite the packs that dropping
left mostly dead (``gccompact``). A block may be named by a file committed
after the listing: its writer asked for it (``hasblocks``) or wrote it
first, so a store never drops a block touched since the collection's
cutoff (its start, less a grace period that covers any upload), and
counts its own start as a touch of every block (touches live in memory).
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import math
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.web import xmlrpc

from surfshard import errors
from surfshard.config import ClusterConfig, NodeKind, node_name, parse_address
from surfshard.keyspace import validate_block_hash
from surfshard.net.methods import Access, MethodTable
from surfshard.net.pool import RpcClientPool
from surfshard.net.port import NodeRoot, listen_now, make_site, node_factory
from surfshard.net.schema import Arg, Value
from surfshard.net.server import RpcServerFactory, server_limits
from surfshard.net.tls import TLSFiles
from surfshard.observe.metrics import MetricsResource, node_registry
from surfshard.observe.statuspage import ClusterResource, ClusterView, PageResource
from surfshard.replica.access import server_access

#: Largest block accepted (SurfStore clients use 4 KiB blocks by default).
MAX_BLOCK_BYTES = 4 * 1024 * 1024
#: Most hashes one hasblocks call may ask about.
MAX_HASBLOCKS = 100_000
#: Most blocks, and bytes, in one putblocks or getblocks call (a reply
#: stays well under the 16 MiB frame limit).
MAX_BATCH_BLOCKS = 1024
MAX_BATCH_BYTES = 8 * 1024 * 1024
#: Most names one listblocks page returns.
MAX_LIST = 10_000
#: A pack file is closed once it holds this much.
PACK_BYTES = 256 * 1024 * 1024
#: A scrub call reads back about this much before it answers.
SCRUB_PAGE_BYTES = 64 * 1024 * 1024
#: The longest grace period a collection may ask for: a store forgets
#: touches older than this (they would protect nothing).
MAX_GC_GRACE = 7 * 24 * 3600.0
#: A pack is rewritten by ``compact`` once this share of it is dead.
COMPACT_DEAD_SHARE = 0.25
#: Bytes of live blocks copied out of a pack per write (and per hold of
#: the store's lock) while it is rewritten.
COMPACT_BATCH_BYTES = 8 * 1024 * 1024
#: A pack record's head: magic, SHA-256 of the data, data length, CRC-32 of
#: the head (less the CRC) and the data.
_HEAD = struct.Struct(">4s32sII")
_MAGIC = b"SSB1"


class BlockStore:
    """Blocks in append-only pack files, ``directory/packs/NNNNNN.pack``.

    A record is a 44-byte head (magic, the block's SHA-256, its length, a
    CRC-32 of the head and data) then the data. A batch of blocks is one
    write and one fsync, where a file per block cost a file creation, a
    rename and two fsyncs each (about 1 ms on this project's disks). The
    index (hash -> pack, offset, length) lives in memory and is rebuilt at
    start by reading the heads; a torn record at the end of the last pack
    (a crash mid-write, never acknowledged: the fsync comes before the
    answer) is cut off. A pack is closed at ``PACK_BYTES``; a new pack's
    name is made durable (directory fsync) before anything in it is
    acknowledged. Blocks of the older layout (``directory/<2 hex>/<hash>``)
    are still read, listed and counted.
    """

    log = Logger()

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        fsync: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._root = str(self.directory)
        self._packs_dir = self.directory / "packs"
        self._packs_dir.mkdir(exist_ok=True)
        self.fsync = fsync
        #: For metrics: blocks and bytes written and blocks read by this
        #: process, blocks whose hash did not match (refused or corrupt),
        #: blocks dropped by collections and pack bytes freed after them.
        self.stats = {
            "written": 0,
            "bytes_written": 0,
            "read": 0,
            "verification_failures": 0,
            "collected": 0,
            "bytes_freed": 0,
        }
        #: hash -> (pack number, offset of the data, length). Writers run in
        #: threads: ``_lock`` guards the index, the current pack and its end.
        self._index: dict[str, tuple[int, int, int]] = {}
        self._lock = threading.Lock()
        self._readers: dict[int, int] = {}  # pack number -> read-only fd
        self._sorted: list[str] | None = None  # hashes in order, for list(); None when stale
        self._pack = 0
        self._pack_fd: int | None = None
        self._pack_end = 0
        #: Readers of each open pack fd right now: a pack rewritten by
        #: ``compact`` has its fd closed only once no read is using it.
        self._fd_users: dict[int, int] = {}
        self._retired_fds: set[int] = set()
        #: For collection (see the module doc): this store's clock (the
        #: monotonic one: a wall clock stepped forward would age every touch
        #: at once, and only the store itself compares its times), when this
        #: process started (a touch of every block), when each block was
        #: last written or asked for since, and the bytes of records in
        #: each pack that no index entry points at any more.
        self._clock = clock
        self.started = clock()
        self._touched: dict[str, float] = {}
        self._touched_pruned = self.started
        self._dead: dict[int, int] = {}
        self._compacting = threading.Lock()
        self._load()

    # -- the packs ------------------------------------------------------------

    def _pack_path(self, number: int) -> str:
        return os.path.join(str(self._packs_dir), f"{number:06d}.pack")

    def _load(self) -> None:
        numbers = sorted(int(p.name[:6]) for p in self._packs_dir.iterdir() if p.name.endswith(".pack"))
        for number in numbers:
            path = self._pack_path(number)
            last = number == numbers[-1]
            pos, size = self._scan(number, path, verify=last)
            if pos < size:
                if not last:
                    raise errors.Internal(f"{path}: damaged at offset {pos}, before the last pack")
                self.log.warn(
                    "{path}: cutting a torn record at offset {pos} ({n} bytes, a crash mid-write)",
                    path=path,
                    pos=pos,
                    n=size - pos,
                )
                with open(path, "r+b") as f:
                    f.truncate(pos)
            self._pack, self._pack_end = number, pos
        if numbers:
            self._pack_fd = os.open(self._pack_path(self._pack), os.O_WRONLY | os.O_APPEND)

    def _scan(self, number: int, path: str, *, verify: bool) -> tuple[int, int]:
        """Index a pack's records; (end of the last whole record, file size).
        Only the last pack can end in a torn record, so only its records'
        CRCs are checked (their data read); older packs are walked head to
        head (each block is checked against its hash whenever it is read)."""
        size = os.path.getsize(path)
        pos = 0
        with open(path, "rb") as f:
            while pos + _HEAD.size <= size:  # bounded: each pass moves on or stops
                f.seek(pos)
                head = f.read(_HEAD.size)
                magic, digest, length, crc = _HEAD.unpack(head)
                end = pos + _HEAD.size + length
                if magic != _MAGIC or end > size:
                    break
                if verify and zlib.crc32(f.read(length), zlib.crc32(head[:-4])) != crc:
                    break
                self._index[digest.hex()] = (number, pos + _HEAD.size, length)
                pos = end
        return pos, size

    def _append(self, records: list[tuple[str, bytes]]) -> None:
        """Write ``records`` (hash, data) at the end of the current pack, in
        one write and one fsync, then index them. Under ``_lock``."""
        if self._pack_fd is None or self._pack_end >= PACK_BYTES:
            self._new_pack()
        assert self._pack_fd is not None
        parts: list[bytes] = []
        placed: list[tuple[str, int, int]] = []
        pos = self._pack_end
        for block_hash, data in records:
            head = _HEAD.pack(_MAGIC, bytes.fromhex(block_hash), len(data), 0)[:-4]
            crc = zlib.crc32(data, zlib.crc32(head))
            parts.append(head + crc.to_bytes(4, "big"))
            parts.append(data)
            placed.append((block_hash, pos + _HEAD.size, len(data)))
            pos += _HEAD.size + len(data)
        payload = b"".join(parts)
        view = memoryview(payload)
        while view:  # bounded: each write makes progress or raises
            view = view[os.write(self._pack_fd, view) :]
        if self.fsync:
            os.fsync(self._pack_fd)
        self._pack_end = pos
        for block_hash, offset, length in placed:
            self._index[block_hash] = (self._pack, offset, length)
        self._sorted = None

    def _new_pack(self) -> None:
        if self._pack_fd is not None:
            os.close(self._pack_fd)
        self._pack += 1
        self._pack_fd = os.open(self._pack_path(self._pack), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._pack_end = 0
        if self.fsync:
            self._sync_dir()

    def _read(self, block_hash: str) -> tuple[bytes | None, tuple[int, int, int] | None]:
        """The block's bytes (None if it is not here), and where in the
        packs they were read (None: the older layout)."""
        with self._lock:
            where = self._index.get(block_hash)
            fd = -1
            if where is not None:
                fd = self._readers.get(where[0], -1)
                if fd < 0:
                    fd = self._readers[where[0]] = os.open(self._pack_path(where[0]), os.O_RDONLY)
                self._fd_users[fd] = self._fd_users.get(fd, 0) + 1
        if where is not None:
            try:
                return os.pread(fd, where[2], where[1]), where
            finally:
                with self._lock:
                    self._release_fd(fd)
        try:
            return self._path(block_hash).read_bytes(), None  # the older layout
        except FileNotFoundError:
            return None, None

    def _forget(self, block_hash: str) -> None:
        """Drop a block from the index, its record counted dead in its pack
        (for ``compact``), or remove its file of the older layout. Under
        ``_lock``."""
        where = self._index.pop(block_hash, None)
        if where is not None:
            self._dead[where[0]] = self._dead.get(where[0], 0) + _HEAD.size + where[2]
        else:
            with contextlib.suppress(FileNotFoundError):
                self._path(block_hash).unlink()
        self._sorted = None

    def _drop_corrupt(self, block_hash: str, where: tuple[int, int, int] | None) -> None:
        """Forget a copy read back corrupt from ``where``: ``has`` then no
        longer claims it, so a repair, or the next writer of the block, puts
        a good copy back (the readers have gone to another store meanwhile).
        Its bytes stay in the pack until the pack is rewritten."""
        with self._lock:
            if where is not None:
                if self._index.get(block_hash) == where:
                    self._forget(block_hash)
                return
            legacy = self._path(block_hash)
            with contextlib.suppress(FileNotFoundError):
                legacy.rename(legacy.with_name(legacy.name + ".corrupt"))  # kept aside, never listed
            self._sorted = None

    def location(self, block_hash: str) -> tuple[str, int, int]:
        """(file, offset, length) of a block's data (for tests that damage it)."""
        with self._lock:
            where = self._index.get(block_hash)
        if where is None:
            path = self._path(block_hash)
            return str(path), 0, path.stat().st_size
        number, offset, length = where
        return self._pack_path(number), offset, length

    def _release_fd(self, fd: int) -> None:
        """A read of ``fd`` is done. Under ``_lock``."""
        users = self._fd_users.pop(fd) - 1
        if users:
            self._fd_users[fd] = users
        elif fd in self._retired_fds:
            self._retired_fds.discard(fd)
            os.close(fd)

    def _retire_pack(self, number: int) -> None:
        """Stop reading pack ``number``: its fd closes now, or when the
        last read using it ends. Under ``_lock``."""
        fd = self._readers.pop(number, -1)
        if fd < 0:
            return
        if self._fd_users.get(fd):
            self._retired_fds.add(fd)
        else:
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            for fd in [self._pack_fd, *self._readers.values(), *self._retired_fds]:
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._pack_fd = None
            self._readers.clear()
            self._retired_fds.clear()

    def _path(self, block_hash: str) -> Path:
        return self.directory / block_hash[:2] / block_hash

    def _have(self, block_hash: str) -> bool:
        return block_hash in self._index or os.path.exists(
            os.path.join(self._root, block_hash[:2], block_hash)
        )

    def put(self, data: bytes, expected: str | None = None) -> str:
        """Store ``data``; returns its hash (storing it again is a no-op).
        With ``expected``, a block whose hash is not that is refused."""
        block_hash = self._checked(data, expected, "block")
        self._store_many([(block_hash, data)])
        return block_hash

    def _checked(self, data: Any, expected: str | None, what: str) -> str:
        """The hash of a block about to be stored; ``BadRequest`` (counted
        and logged) if it is not bytes, is too big, or is not ``expected``."""
        if not isinstance(data, bytes):
            raise errors.BadRequest(f"{what} must be bytes")
        if len(data) > MAX_BLOCK_BYTES:
            raise errors.BadRequest(f"{what} of {len(data)} bytes is over the limit of {MAX_BLOCK_BYTES}")
        actual = hashlib.sha256(data).hexdigest()
        if expected is not None and expected != actual:
            self.stats["verification_failures"] += 1
            self.log.warn(
                "refused a block sent as {expected}: its hash is {actual}", expected=expected, actual=actual
            )
            raise errors.BadRequest(f"{what} sent as {expected} has hash {actual}", hash=expected)
        return actual

    def _store_many(self, blocks: list[tuple[str, bytes]]) -> None:
        """Append the blocks not stored yet (checked against their hashes
        already), one write and one fsync for all of them."""
        with self._lock:
            seen: set[str] = set()
            todo = []
            for block_hash, data in blocks:
                if block_hash not in seen and not self._have(block_hash):
                    seen.add(block_hash)
                    todo.append((block_hash, data))
            if todo:
                self._append(todo)
            self._touch(h for h, _ in blocks)
        self.stats["written"] += len(todo)
        self.stats["bytes_written"] += sum(len(d) for _, d in todo)

    def get(self, block_hash: str) -> bytes:
        validate_block_hash(block_hash)
        data, where = self._read(block_hash)
        if data is None:
            raise errors.BadRequest(f"no block {block_hash}", missing=block_hash)
        if hashlib.sha256(data).hexdigest() != block_hash:
            self.stats["verification_failures"] += 1
            self.log.error(
                "block {hash} is corrupt on disk: dropped here, to be copied back", hash=block_hash
            )
            self._drop_corrupt(block_hash, where)
            raise errors.Internal(f"block {block_hash} is corrupt on this store")
        self.stats["read"] += 1
        return data

    def has(self, hashes: list[str]) -> list[str]:
        """The subset of ``hashes`` stored here, in the order given."""
        for h in hashes:
            validate_block_hash(h)
        with self._lock:
            present = [h for h in hashes if self._have(h)]
            # Whoever asks may be about to name these in a file: a
            # collection running now must keep them (see the module doc).
            self._touch(present)
            return present

    def put_many(self, blocks: list[list[Any]]) -> list[str]:
        """Store ``[[hash, data], ...]``, each checked against its hash
        (all checked before any is stored); returns the hashes."""
        checked = []
        for i, item in enumerate(blocks):
            if not (isinstance(item, list) and len(item) == 2):
                raise errors.BadRequest(f"blocks[{i}] must be [hash, bytes]")
            expected = validate_block_hash(item[0])
            checked.append((self._checked(item[1], expected, f"blocks[{i}]"), item[1]))
        self._store_many(checked)
        return [block_hash for block_hash, _ in checked]

    def get_many(self, hashes: list[str]) -> dict[str, Any]:
        """``{"blocks": {hash: data}, "missing": [...], "corrupt": [...]}``:
        a corrupt copy is reported (and logged), never served."""
        found: dict[str, bytes] = {}
        missing: list[str] = []
        corrupt: list[str] = []
        for h in hashes:
            try:
                found[h] = self.get(h)
            except errors.Internal:
                corrupt.append(h)
            except errors.BadRequest as e:
                if e.details.get("missing") != h:
                    raise
                missing.append(h)
        return {"blocks": found, "missing": missing, "corrupt": corrupt}

    def scrub(self, after: str = "", max_bytes: int = SCRUB_PAGE_BYTES) -> dict[str, Any]:
        """Read back and check the blocks after ``after`` (in hash order), up
        to about ``max_bytes`` of them; a corrupt copy is dropped as ``get``
        drops one, for a repair to put a good copy back. Returns
        ``{"checked": n, "corrupt": [...], "last": hash}``, ``last`` empty
        once every block was checked."""
        if after:
            validate_block_hash(after)
        checked, read = 0, 0
        corrupt: list[str] = []
        while True:  # bounded: each page moves ``after`` on, or ends
            page = self.list(after, 256)
            if not page:
                return {"checked": checked, "corrupt": corrupt, "last": ""}
            for h in page:
                after = h
                checked += 1
                try:
                    read += len(self.get(h))
                except errors.Internal:
                    corrupt.append(h)
                except errors.BadRequest:
                    continue  # gone since the listing
                if read >= max_bytes:
                    return {"checked": checked, "corrupt": corrupt, "last": after}

    def usage(self) -> dict[str, int]:
        """What this store holds: ``blocks`` (in packs), ``pack_bytes`` (the
        pack files' size) and ``dead_bytes`` (blocks dropped whose packs were
        not rewritten yet)."""
        with self._lock:
            blocks = len(self._index)
            dead = sum(self._dead.values())
        size = 0
        with os.scandir(self._packs_dir) as entries:  # a few files: packs are large
            for entry in entries:
                if entry.name.endswith(".pack"):
                    with contextlib.suppress(FileNotFoundError):
                        size += entry.stat().st_size
        return {"blocks": blocks, "pack_bytes": size, "dead_bytes": dead}

    # -- collection -------------------------------------------------------------

    def _touch(self, hashes: Any) -> None:
        """Note that ``hashes`` were written or asked for now. Under ``_lock``."""
        now = self._clock()
        touched = self._touched
        for h in hashes:
            touched[h] = now
        if now - self._touched_pruned > MAX_GC_GRACE:
            # Bounded memory: touches older than any grace protect nothing.
            horizon = now - MAX_GC_GRACE
            self._touched = {h: t for h, t in touched.items() if t >= horizon}
            self._touched_pruned = now

    def gc_clock(self) -> dict[str, float]:
        """This store's clock now and when it started: a collection takes its
        cutoff from the store's own clock, never the caller's."""
        return {"now": self._clock(), "started": self.started}

    def sweep(self, hashes: list[str], before: float, dry_run: bool = False) -> dict[str, Any]:
        """Drop the blocks of ``hashes`` stored here that nothing wrote or
        asked for at or after ``before`` (this store's clock). The caller
        knows no file names them; one named by a file committed later was
        touched by its writer after ``before`` (see the module doc). Returns
        ``{"removed": [...], "kept": [...], "restarted": bool}``: ``kept``
        the ones touched since, ``restarted`` whether this store started
        after ``before`` (then every block counts as touched). Their space
        is reclaimed by ``compact``; until then a restart brings them back,
        which costs only space."""
        for h in hashes:
            validate_block_hash(h)
        now = self._clock()
        if not math.isfinite(before):
            raise errors.BadRequest("the cutoff must be a finite time")
        if before > now:
            raise errors.BadRequest(f"the cutoff {before} is after this store's clock ({now})")
        if before < now - MAX_GC_GRACE:
            raise errors.BadRequest(
                f"the cutoff is more than {MAX_GC_GRACE:.0f} s back: this store does not remember touches so old"
            )
        removed: list[str] = []
        kept: list[str] = []
        with self._lock:
            restarted = self.started >= before
            touched = self._touched
            for h in hashes:
                if not self._have(h):
                    continue
                if restarted or touched.get(h, 0.0) >= before:
                    kept.append(h)
                    continue
                removed.append(h)
                if not dry_run:
                    self._forget(h)
        if removed and not dry_run:
            self.stats["collected"] += len(removed)
            self.log.info("collection: dropped {n} blocks no file names", n=len(removed))
        return {"removed": removed, "kept": kept, "restarted": restarted}

    def compact(self, dead_share: float = COMPACT_DEAD_SHARE) -> dict[str, int]:
        """Rewrite every pack of which at least ``dead_share`` is dropped
        blocks: its live blocks are appended to the current pack (written and
        synced), then the pack is deleted. A crash midway leaves both copies
        of some blocks, which is harmless (the later pack's is read).
        Returns ``{"packs": rewritten, "freed": bytes, "moved": blocks}``
        (``freed``: the packs' size less what their live blocks take again)."""
        with self._compacting:  # one rewrite at a time (two gc runs may overlap)
            return self._compact(dead_share)

    def _compact(self, dead_share: float) -> dict[str, int]:
        with self._lock:
            sizes = {}
            for number, dead in self._dead.items():
                with contextlib.suppress(FileNotFoundError):
                    size = os.path.getsize(self._pack_path(number))
                    if size and dead >= dead_share * size:
                        sizes[number] = size
            if self._pack in sizes:
                self._new_pack()  # the pack being written to is rewritten too
        freed = moved = 0
        for number, size in sorted(sizes.items()):
            copied, copied_bytes = self._rewrite(number)
            moved += copied
            with self._lock:
                self._retire_pack(number)
                os.unlink(self._pack_path(number))
                self._dead.pop(number, None)
                if self.fsync:
                    self._sync_dir()
            freed += size - copied_bytes
            self.stats["bytes_freed"] += size - copied_bytes
            self.log.info(
                "collection: rewrote pack {number}, {freed} bytes freed",
                number=number,
                freed=size - copied_bytes,
            )
        return {"packs": len(sizes), "freed": freed, "moved": moved}

    def _rewrite(self, number: int) -> tuple[int, int]:
        """Copy pack ``number``'s live blocks to the current pack, a batch at
        a time; returns how many were copied, and the bytes they take."""
        with self._lock:
            entries = list(self._index.items())  # a copy in C: the lock is held briefly
        # Nothing is appended to this pack any more (``compact`` rolled the
        # current one), so its blocks are these or fewer.
        live = sorted((where[1], where[2], h) for h, where in entries if where[0] == number)
        del entries
        copied = copied_bytes = 0
        fd = os.open(self._pack_path(number), os.O_RDONLY)
        try:
            batch: list[tuple[str, bytes]] = []
            size = 0
            for i, (offset, length, h) in enumerate(live):
                data = os.pread(fd, length, offset)
                if hashlib.sha256(data).hexdigest() != h:
                    # Never copy a bad block; the other copies stay, and a
                    # repair puts one back here.
                    self.stats["verification_failures"] += 1
                    self.log.error(
                        "block {hash} is corrupt on disk: dropped as its pack is rewritten", hash=h
                    )
                else:
                    batch.append((h, data))
                    size += length
                if size >= COMPACT_BATCH_BYTES or i == len(live) - 1:
                    with self._lock:
                        # Only blocks still read from this pack: a sweep may
                        # have dropped some meanwhile.
                        todo = [(bh, d) for bh, d in batch if self._index.get(bh, (-1,))[0] == number]
                        if todo:
                            self._append(todo)
                    copied += len(todo)
                    copied_bytes += sum(_HEAD.size + len(d) for _, d in todo)
                    batch, size = [], 0
            with self._lock:
                # Anything still read from here was corrupt: it is gone.
                for _offset, _length, h in live:
                    where = self._index.get(h)
                    if where is not None and where[0] == number:
                        del self._index[h]  # not counted dead: the whole pack goes
                        self._sorted = None
        finally:
            os.close(fd)
        return copied, copied_bytes

    def _sync_dir(self) -> None:
        dir_fd = os.open(str(self._packs_dir), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def list(self, after: str = "", limit: int = MAX_LIST) -> list[str]:
        """Up to ``limit`` stored hashes greater than ``after``, in order
        (for repair, a page at a time)."""
        with self._lock:
            if self._sorted is None:
                legacy = [
                    name
                    for prefix in self.directory.iterdir()
                    if prefix.is_dir() and len(prefix.name) == 2
                    for name in os.listdir(prefix)
                    if len(name) == 64
                ]
                self._sorted = sorted(set(self._index).union(legacy))
            ordered = self._sorted
        start = bisect.bisect_right(ordered, after)
        return ordered[start : start + limit]


def _inline(call: Callable[..., Any], *args: Any) -> Any:
    return call(*args)


def blockstore_methods(store: BlockStore, run: Callable[..., Any] = _inline) -> MethodTable:
    """The native methods of ``store``; ``run(call, *args)`` runs each disk
    operation (the service: in a thread, returning a Deferred)."""
    t = MethodTable(service="blockstore")
    # Handlers get the wire argument names as keywords.
    t.add(
        "putblock",
        lambda data, hash=None: run(store.put, data, hash),
        [
            Arg("data", bytes, max_bytes=MAX_BLOCK_BYTES),
            Arg("hash", str, required=False, min_len=64, max_len=64),
        ],
    )
    t.add("getblock", lambda hash: run(store.get, hash), [Arg("hash", str, min_len=64, max_len=64)])
    t.add(
        "hasblocks",
        lambda hashes: run(store.has, hashes),
        [Arg("hashes", Value(list, max_len=MAX_HASBLOCKS, items=Value(str, max_len=64)))],
    )
    t.add(
        "putblocks",
        lambda blocks: run(store.put_many, blocks),
        [Arg("blocks", Value(list, max_len=MAX_BATCH_BLOCKS, items=Value(list, min_len=2, max_len=2)))],
    )
    t.add(
        "getblocks",
        lambda hashes: run(store.get_many, hashes),
        [Arg("hashes", Value(list, max_len=MAX_BATCH_BLOCKS, items=Value(str, min_len=64, max_len=64)))],
    )
    t.add(
        "listblocks",
        lambda after="", limit=MAX_LIST: run(store.list, after, limit),
        [
            Arg("after", str, required=False, max_len=64),
            Arg("limit", int, required=False, min=1, max=MAX_LIST),
        ],
    )
    # Reading every block back (``surfshard blocks scrub``): operators only.
    t.add(
        "scrubblocks",
        lambda after="": run(store.scrub, after),
        [Arg("after", str, required=False, max_len=64)],
        access=(Access.ADMIN,),
    )
    # Collection (``surfshard blocks gc``): operators only.
    t.add("gcclock", lambda: run(store.gc_clock), [], access=(Access.ADMIN,))
    t.add(
        "gcsweep",
        lambda hashes, before, dry_run=False: run(store.sweep, hashes, before, dry_run),
        [
            Arg("hashes", Value(list, max_len=MAX_LIST, items=Value(str, min_len=64, max_len=64))),
            Arg("before", (int, float)),
            Arg("dry_run", bool, default=False),
        ],
        access=(Access.ADMIN,),
    )
    t.add("gccompact", lambda: run(store.compact), [], access=(Access.ADMIN,))
    t.add("ping", lambda: True)
    return t


class BlockStoreXMLRPC(xmlrpc.XMLRPC):
    """SurfStore's ``surfstore.getblock/putblock/hasblocks/ping``."""

    def __init__(self, store: BlockStore, run: Callable[..., Any] = _inline) -> None:
        super().__init__(allowNone=True)
        self.store = store
        #: Runs each disk operation (the service: in a thread).
        self.run = run

    def _guard(self, call: Any, *args: Any) -> defer.Deferred:
        from surfshard.metadata.facade import to_fault

        def fault(failure: Any) -> Any:
            if failure.check(errors.SurfShardError):
                return to_fault(failure.value)
            return to_fault(errors.Internal("internal error"))

        return defer.maybeDeferred(self.run, call, *args).addErrback(fault)

    def xmlrpc_ping(self) -> Any:
        return True

    def xmlrpc_putblock(self, block: Any) -> Any:
        def call() -> bool:
            data = block.data if isinstance(block, xmlrpc.Binary) else block
            if isinstance(data, str):
                data = data.encode("utf-8")
            self.store.put(data)
            return True

        return self._guard(call)

    def xmlrpc_getblock(self, block_hash: Any) -> Any:
        def call() -> xmlrpc.Binary:
            if not isinstance(block_hash, str):
                raise errors.BadRequest("hash must be a string")
            return xmlrpc.Binary(self.store.get(block_hash))

        return self._guard(call)

    def xmlrpc_hasblocks(self, hashes: Any) -> Any:
        def call() -> list[str]:
            if not isinstance(hashes, list) or not all(isinstance(h, str) for h in hashes):
                raise errors.BadRequest("hashlist must be a list of strings")
            if len(hashes) > MAX_HASBLOCKS:
                raise errors.BadRequest(f"at most {MAX_HASBLOCKS} hashes per call")
            return self.store.has(hashes)

        return self._guard(call)


class BlockStoreService(service.Service):
    name: str  # type: ignore[assignment]  # Service declares name = None; always set here
    """Block store ``index`` of the config, on its port."""

    log = Logger()

    def __init__(
        self, cluster: ClusterConfig, index: int, reactor: Any, *, fsync: bool | None = None
    ) -> None:
        self.cluster = cluster
        self.reactor = reactor
        self.name = node_name(NodeKind.BLOCKSTORE, 0, index)
        self.address = cluster.node_address(NodeKind.BLOCKSTORE, 0, index)
        data_dir = Path(cluster.node_data_dir(NodeKind.BLOCKSTORE, 0, index))
        self.store = BlockStore(data_dir / "blocks", fsync=cluster.raft.fsync if fsync is None else fsync)

        def in_thread(call: Callable[..., Any], *args: Any) -> Any:
            return threads.deferToThreadPool(reactor, reactor.getThreadPool(), call, *args)

        self.table = blockstore_methods(self.store, in_thread)
        self.table.add("status", self.status)
        self.root = NodeRoot()
        rpc2 = xmlrpc.XMLRPC(allowNone=True)
        rpc2.putSubHandler("surfstore", BlockStoreXMLRPC(self.store, in_thread))
        self.root.add("RPC2", rpc2)
        self.root.add("metrics", MetricsResource(node_registry(self)))

        self.rpc_factory: RpcServerFactory | None = None
        self.tls_files = None
        if cluster.tls is not None:
            cert, key = cluster.tls.cert_paths(self.name)
            self.tls_files = TLSFiles(ca=str(cluster.tls.ca), cert=str(cert), key=str(key))
        # The status page asks the other nodes how they are.
        self.pool = RpcClientPool(reactor, tls=self.tls_files)
        self.root.add("cluster", ClusterResource(ClusterView(cluster, self.pool, self.name, self.reactor)))
        self.root.index = PageResource()
        self.listening_port: Any = None

    def status(self) -> dict[str, Any]:
        """Who this is and what it holds (``BlockStore.usage``)."""
        return {"role": "blockstore", "name": self.name, "address": self.address, **self.store.usage()}

    def _make_rpc_factory(self) -> RpcServerFactory:
        self.rpc_factory = RpcServerFactory(
            self.table, self.reactor, server_limits(self.cluster), **server_access(self.cluster, self.name)
        )
        return self.rpc_factory

    def startService(self) -> None:
        super().startService()
        host, port = parse_address(self.address)
        factory = node_factory(
            self._make_rpc_factory(),
            make_site(self.root, clock=self.reactor, max_body=self.cluster.limits.max_http_body),
            self.reactor,
            tls=self.tls_files,
            max_connections=self.cluster.limits.max_connections,
        )
        try:
            self.listening_port = listen_now(self.reactor, port, factory, host)
        except Exception as e:
            self.log.critical(
                "{name}: cannot listen on {address}: {e}", name=self.name, address=self.address, e=e
            )
            raise
        self.log.info(
            "{name} serving blocks on {address}, stored in {directory}",
            name=self.name,
            address=self.address,
            directory=str(self.store.directory),
        )

    @defer.inlineCallbacks
    def stopService(self):
        if self.listening_port is not None:
            yield self.listening_port.stopListening()
        yield self.pool.close()
        yield super().stopService()
        self.store.close()
