"""Stable storage for a Raft node: ``MemoryStorage`` for tests, ``DiskStorage``
for real nodes.

``DiskStorage`` keeps, in one directory:

- ``wal``: an append-only write-ahead log. An 8-byte magic header (format 2:
  ``RAFTWAL\\x02``), then records framed as
  ``length (u32 BE) | crc32 (u32 BE) | CBOR map``. The CRC
  covers the record's file offset and length as well as its payload, so a
  valid-looking record copied to another place (inside an entry's opaque data,
  say) never validates there, and a corrupt length field is caught like a
  corrupt payload.
- ``snapshot``: the latest snapshot, same framing after its own header,
  replaced atomically (temp file, fsync, rename, fsync of the directory).
- ``LOCK``: held with ``flock`` while the storage is open, so two processes
  never write the same log.

WAL records (the ``t`` key says which):

- ``b`` (base): first record of a compacted WAL, the snapshot it follows.
- ``h``: a hard state, replacing the previous one.
- ``e``: a run of contiguous entries, as columns: ``i`` the first index,
  ``et`` the terms (one int, or ``[term, count, ...]`` runs), ``ed`` the
  payloads, and ``ek`` the kinds of entries that are not NORMAL (membership
  changes; absent when there are none); replaces the stored suffix from ``i``
  on (a follower resolving a conflict). It may also carry ``h``, a hard
  state applied after the entries.

A hard state is not written when it is set but with the next entries record
(or on its own at ``sync()`` if none comes): a leader's commit index changes
in one Ready and its next entries arrive in the next, and both then cost one
record, one CBOR encoding and one CRC. Where in the batch a hard state lands
does not change what a replay yields (a hard state is one value, replaced
whole, and committed entries are never overwritten), and it never lands in a
record before the step that set it, so a torn tail still recovers a state the
storage passed through.

Format 2 (entries as columns, hard state folded into the entries record)
replaced format 1 (one ``[term, index, data]`` list per entry), which was
much slower to encode (a CBOR list per entry; figures in
``benchmarks/storage.py``). A format-1 WAL is refused with a clear
error, not converted: there was no deployed data to carry over.

Writes are buffered until ``sync()``, which issues one ``write`` and one
``fdatasync`` for everything since the previous sync: group commit.

The WAL is preallocated (``posix_fallocate``, ``WAL_PREALLOCATE`` bytes at a
time, as etcd's WAL segments are): records overwrite space the file already
has, so the file's size changes once per chunk instead of on every sync, and
an ``fdatasync`` has no size to write to the file system's journal with
the data. ``benchmarks/storage.py`` measures it: on this project's 2-core
VM a one-entry sync went from about 290 to 210 µs alone, and from about
440 to 380 µs with three processes syncing at once (one run, two rounds
each). The log so ends where the records stop and zeros begin; a file
system without ``fallocate`` gets plain appends, and replay reads both.

``save_snapshot`` is durable when it returns: it first syncs what is
pending (so a crash before the WAL is compacted leaves a WAL that is
complete up to the snapshot), writes the snapshot file, then rewrites the
WAL to hold only what follows the snapshot -- O(remaining entries).

Recovery (``load``): read the snapshot, replay the WAL. Zeros where the next
record would start, with only zeros after them, are the preallocated end of
the log. A record that fails validation with no valid record after it is a
write torn by a crash: it is truncated away and logged. A bad record
*followed by* valid ones is real corruption of data that may have been
acknowledged: ``StorageCorrupt``, naming the file and offset, rather than
silently dropping what follows.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
import time
import zlib
from typing import Any

import cbor2
from twisted.logger import Logger
from twisted.python.filepath import FilePath
from zope.interface import implementer

from raft.errors import RaftError, StorageCorrupt
from raft.interfaces import ISnapshotFile, IStorage
from raft.stats import Histogram
from raft.types import (
    Entry,
    HardState,
    Snapshot,
    SnapshotMeta,
    check_contiguous,
    entries_from_columns,
    entries_to_columns,
    kinds_column,
)

log = Logger()

WAL_MAGIC = b"RAFTWAL\x02"
#: The header of the WAL format this version no longer reads.
_OLD_WAL_MAGICS = (b"RAFTWAL\x01",)
SNAPSHOT_MAGIC = b"RAFTSNP\x01"
_HEADER_LEN = 8
_FRAME = struct.Struct(">II")  # payload length, crc
_CRC_PREFIX = struct.Struct(">QI")  # record offset, payload length
# Compaction writes the remaining entries in chunks so no single record (and
# no single CBOR decode on recovery) grows with the log.
_ENTRIES_PER_COMPACTED_RECORD = 1024


class StorageLocked(RaftError):
    """Another process (or another open storage object) holds the directory."""


class StorageFailed(RaftError):
    """An earlier write or fsync failed. The storage refuses further work: after
    a failed fsync the kernel may have dropped dirty pages, so retrying could
    report durability that does not exist (restart and recover instead)."""


class StorageClosed(RaftError):
    """The storage was closed."""


# --------------------------------------------------------------------------
# The logical content shared by both storages.


#: The meta of "no snapshot yet" (frozen, so one serves every log): a
#: fresh log asks for it on every append.
_NO_SNAPSHOT = SnapshotMeta()


class _LogState:
    """Hard state, snapshot and the entries after it, with the overwrite and
    compaction rules of ``IStorage``. Both storages keep one in memory;
    ``DiskStorage`` rebuilds it by replaying its WAL."""

    __slots__ = ("entries", "hard_state", "snapshot")

    def __init__(self) -> None:
        self.hard_state = HardState()
        self.snapshot: Snapshot | None = None
        self.entries: list[Entry] = []

    def copy(self) -> _LogState:
        other = _LogState()
        other.hard_state = self.hard_state
        other.snapshot = self.snapshot
        other.entries = list(self.entries)
        return other

    @property
    def snapshot_meta(self) -> SnapshotMeta:
        return self.snapshot.meta if self.snapshot is not None else _NO_SNAPSHOT

    @property
    def last_index(self) -> int:
        return self.entries[-1].index if self.entries else self.snapshot_meta.index

    def term_at(self, index: int) -> int | None:
        meta = self.snapshot_meta
        if index == meta.index:
            return meta.term
        offset = index - meta.index - 1
        if 0 <= offset < len(self.entries):
            return self.entries[offset].term
        return None

    def check_append(self, entries: list[Entry]) -> list[Entry]:
        """Validate a batch against the stored log; returns the part not
        already covered by the snapshot (those entries are committed, so they
        agree with it and storing them again would only waste space)."""
        if not entries:
            return []
        if not check_contiguous(entries, entries[0].index):
            for prev, nxt in zip(entries, entries[1:], strict=False):
                if nxt.index != prev.index + 1:
                    raise ValueError(f"entries to append are not contiguous: {prev.index} then {nxt.index}")
        if entries[0].index < 1:
            raise ValueError(f"entry index must be >= 1, got {entries[0].index}")
        if entries[0].index > self.last_index + 1:
            raise ValueError(
                f"append would leave a gap: first new index {entries[0].index}, last stored {self.last_index}"
            )
        snap_index = self.snapshot_meta.index
        if entries[0].index > snap_index:
            return entries
        return [e for e in entries if e.index > snap_index]

    def append(self, entries: list[Entry]) -> None:
        """Apply a batch that passed ``check_append``."""
        if not entries:
            return
        keep = entries[0].index - self.snapshot_meta.index - 1
        del self.entries[keep:]
        self.entries.extend(entries)

    def check_snapshot(self, snapshot: Snapshot) -> None:
        if snapshot.meta.index < self.snapshot_meta.index:
            raise ValueError(
                f"snapshot at index {snapshot.meta.index} is older than the stored one "
                f"at {self.snapshot_meta.index}"
            )

    def save_snapshot(self, snapshot: Snapshot) -> None:
        """Install ``snapshot``: entries it covers go; entries after it stay
        only if our log agrees with it at its index (otherwise our log is a
        stale branch and all of it goes, as in the thesis' InstallSnapshot)."""
        meta = snapshot.meta
        agrees = self.term_at(meta.index) == meta.term
        if agrees:
            del self.entries[: meta.index - self.snapshot_meta.index]
        else:
            self.entries = []
        self.snapshot = snapshot

    def view(self) -> tuple[HardState, Snapshot | None, list[Entry]]:
        """What ``load`` returns. The commit index is raised to the snapshot
        index: a snapshot only ever holds committed state, and the snapshot is
        durable before the hard state that goes with it is synced."""
        hs = self.hard_state
        snap_index = self.snapshot_meta.index
        if hs.commit < snap_index:
            hs = HardState(hs.term, hs.vote, snap_index)
        return hs, self.snapshot, list(self.entries)


# --------------------------------------------------------------------------
# MemoryStorage


@implementer(IStorage)
class MemoryStorage:
    """In-memory ``IStorage`` for tests.

    Hand the same object to a restarted node and it finds everything stored.
    ``simulate_crash()`` additionally drops what was stored but never synced,
    the way a power loss would, to catch a driver that acknowledges before
    ``sync()``. ``save_snapshot`` is durable at once (and makes what preceded
    it durable), like ``DiskStorage``'s.
    """

    def __init__(self) -> None:
        self._current = _LogState()
        self._durable = _LogState()
        # Operations since the last sync, replayed onto ``_durable`` by sync():
        # O(work since the last sync) instead of copying the whole log.
        self._pending: list[tuple[str, Any]] = []
        #: sync() calls that had something to make durable.
        self.fsyncs = 0

    def load(self) -> tuple[HardState, Snapshot | None, list[Entry]]:
        return self._current.view()

    def append(self, entries: list[Entry]) -> None:
        entries = self._current.check_append(list(entries))
        if entries:
            self._current.append(entries)
            self._pending.append(("append", entries))

    def set_hard_state(self, state: HardState) -> None:
        if state != self._current.hard_state:
            self._current.hard_state = state
            self._pending.append(("hard_state", state))

    def save_snapshot(self, snapshot: Snapshot) -> None:
        self._current.check_snapshot(snapshot)
        self._make_durable()
        self._current.save_snapshot(snapshot)
        self._durable.save_snapshot(snapshot)

    def sync(self) -> None:
        if self._pending:
            self._make_durable()
            self.fsyncs += 1

    def close(self) -> None:
        self.sync()

    def simulate_crash(self) -> None:
        """Forget everything not yet synced (a power loss right now)."""
        self._pending.clear()
        self._current = self._durable.copy()

    def _make_durable(self) -> None:
        for kind, arg in self._pending:
            if kind == "append":
                self._durable.append(arg)
            else:
                self._durable.hard_state = arg
        self._pending.clear()


# --------------------------------------------------------------------------
# File access seam


class Syscalls:
    """The file operations ``DiskStorage`` uses to change the disk.

    A seam for fault injection: tests substitute a subclass that "dies" after
    k operations or k bytes. Each method looks its ``os`` function up at call
    time so monkeypatching ``os.fsync`` is seen too.
    """

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        return os.open(path, flags, mode)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def fallocate(self, fd: int, offset: int, length: int) -> None:
        os.posix_fallocate(fd, offset, length)

    def ftruncate(self, fd: int, length: int) -> None:
        os.ftruncate(fd, length)

    def replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def close(self, fd: int) -> None:
        os.close(fd)


# --------------------------------------------------------------------------
# Framing


def _record_crc(offset: int, payload: bytes | memoryview) -> int:
    return zlib.crc32(payload, zlib.crc32(_CRC_PREFIX.pack(offset, len(payload))))


def _frame(offset: int, payload: bytes) -> bytes:
    """One record as it sits at ``offset`` in its file."""
    return _FRAME.pack(len(payload), _record_crc(offset, payload)) + payload


def _frame_pieces(offset: int, pieces: list[bytes]) -> list[bytes]:
    """``_frame(offset, b"".join(pieces))`` without joining: the frame's
    head, then the pieces."""
    length = sum(len(p) for p in pieces)
    crc = zlib.crc32(_CRC_PREFIX.pack(offset, length))
    for piece in pieces:
        crc = zlib.crc32(piece, crc)
    return [_FRAME.pack(length, crc), *pieces]


def _cbor_bytes_head(n: int) -> bytes:
    """The head of a CBOR byte string of ``n`` bytes."""
    for extra, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < 24:
            return bytes((0x40 | n,))
        if n < 1 << (8 * size):
            return bytes((0x40 | extra,)) + n.to_bytes(size, "big")
    raise ValueError(f"{n} bytes is too long")


def _read_record(buf: memoryview, pos: int) -> memoryview | None:
    """The payload of a valid record at ``pos``, or None."""
    if len(buf) - pos < _FRAME.size:
        return None
    length, crc = _FRAME.unpack_from(buf, pos)
    start = pos + _FRAME.size
    if length == 0 or length > len(buf) - start:
        return None
    payload = buf[start : start + length]
    if _record_crc(pos, payload) != crc:
        return None
    return payload


def _next_valid_record(buf: memoryview, start: int, stop: int) -> int | None:
    """Offset of the first valid record at or after ``start``, or None.

    Only on the error path. A record's length is not zero, so none starts
    at or after ``stop``, where the zeros at the end of the file begin.
    Every payload we write is a CBOR map, so most offsets are rejected on
    one byte before any CRC is computed."""
    last = min(len(buf) - _FRAME.size - 1, stop - 1)
    for pos in range(start, last + 1):
        if 0xA0 <= buf[pos + _FRAME.size] <= 0xBF and _read_record(buf, pos) is not None:
            return pos
    return None


def _fs_path(directory: str | FilePath[str]) -> str:
    if isinstance(directory, FilePath):
        return os.fsdecode(directory.path)
    return os.fspath(directory)


# --------------------------------------------------------------------------
# DiskStorage


@implementer(IStorage, ISnapshotFile)
class DiskStorage:
    """``IStorage`` on a directory: WAL + snapshot file (see the module doc).

    ``fsync=False`` makes ``sync()`` write to the OS without fsyncing (and
    skips the snapshot/directory fsyncs): for tests and benchmarks only.
    ``preallocate``: bytes the WAL grows by at a time (default
    ``WAL_PREALLOCATE``; 0 for plain appends).
    The directory is locked from construction until ``close()``.
    """

    WAL_NAME = "wal"
    #: Bytes the WAL grows by at a time (module docstring); 0 turns
    #: preallocation off.
    WAL_PREALLOCATE = 4 << 20
    SNAPSHOT_NAME = "snapshot"
    LOCK_NAME = "LOCK"
    _TMP_SUFFIX = ".tmp"

    def __init__(
        self,
        directory: str | FilePath[str],
        fsync: bool = True,
        *,
        syscalls: Syscalls | None = None,
        preallocate: int | None = None,
    ) -> None:
        self.directory = _fs_path(directory)
        os.makedirs(self.directory, exist_ok=True)
        self._sys = syscalls if syscalls is not None else Syscalls()
        self._fsync = fsync
        self._lock_fd: int | None = self._acquire_lock()
        self._wal_path = os.path.join(self.directory, self.WAL_NAME)
        self._snapshot_path = os.path.join(self.directory, self.SNAPSHOT_NAME)
        self._state: _LogState | None = None  # None until load()
        self._wal_fd: int | None = None
        self._wal_end = 0  # where the next record goes: end of the written records + pending bytes
        #: The WAL file's size: at least the end of the written records,
        #: zeros after it (preallocated).
        self._wal_allocated = 0
        self._preallocate = self.WAL_PREALLOCATE if preallocate is None else preallocate
        self._pending = bytearray()
        # The last entries record and the latest hard state, not framed yet
        # so that the hard state can ride in an entries record (module doc).
        self._open_record: dict[str, Any] | None = None
        self._open_hard_state: dict[str, Any] | None = None
        self._failed: BaseException | None = None
        self._closed = False
        #: Held while the snapshot file is written, which ``write_snapshot``
        #: does from another thread; guards ``_written_snapshot_index``, the
        #: index of the newest snapshot file written (never goes back).
        self._snapshot_lock = threading.Lock()
        self._written_snapshot_index = 0
        #: sync rounds that had something to write; with fsync=True each is
        #: exactly one os.fsync of the WAL (snapshot/compaction fsyncs aside).
        self.fsyncs = 0
        #: How long each fsync of the WAL took (for metrics).
        self.fsync_seconds = Histogram()

    # -- IStorage

    def load(self) -> tuple[HardState, Snapshot | None, list[Entry]]:
        return self._loaded_state().view()

    def append(self, entries: list[Entry]) -> None:
        state = self._loaded_state()
        entries = state.check_append(list(entries))
        if entries:
            terms, datas = entries_to_columns(entries)
            self._check_usable()
            self._close_record()
            self._open_record = {"t": "e", "i": entries[0].index, "et": terms, "ed": datas}
            kinds = kinds_column(entries)
            if kinds is not None:
                self._open_record["ek"] = kinds
            state.append(entries)

    def set_hard_state(self, state: HardState) -> None:
        log_state = self._loaded_state()
        if state != log_state.hard_state:
            self._open_hard_state = state.to_wire()
            log_state.hard_state = state

    def save_snapshot(self, snapshot: Snapshot) -> None:
        state = self._loaded_state()
        state.check_snapshot(snapshot)
        self.sync()
        try:
            with self._snapshot_lock:
                self._write_snapshot_file(snapshot)
                self._written_snapshot_index = snapshot.meta.index
            state.save_snapshot(snapshot)
            self._compact_wal(state)
        except BaseException as e:
            self._failed = e
            raise

    # -- ISnapshotFile

    def write_snapshot(self, snapshot: Snapshot) -> None:
        # Only the snapshot file (temp, fsync, rename, directory fsync): the
        # WAL and the in-memory state stay the event loop's. A crash after
        # this and before ``install_written_snapshot`` leaves a snapshot
        # newer than the WAL's base, which recovery takes (the same state
        # as a crash inside ``save_snapshot``).
        with self._snapshot_lock:
            if snapshot.meta.index <= self._written_snapshot_index:
                return
            self._write_snapshot_file(snapshot)
            self._written_snapshot_index = snapshot.meta.index

    def install_written_snapshot(self, snapshot: Snapshot) -> None:
        state = self._loaded_state()
        if snapshot.meta.index <= state.snapshot_meta.index:
            return
        with self._snapshot_lock:
            if self._written_snapshot_index != snapshot.meta.index:
                return  # the file holds another snapshot now: this one is gone
        self.sync()
        try:
            state.save_snapshot(snapshot)
            self._compact_wal(state)
        except BaseException as e:
            self._failed = e
            raise

    def sync(self) -> None:
        self._check_usable()
        self._frame_open_records()
        if not self._pending or self._wal_fd is None:
            return
        try:
            self._make_room(len(self._pending))
            self._write_all(self._wal_fd, self._pending)
            if self._fsync:
                started = time.perf_counter()
                # Data only: the size changes with a preallocation, which
                # fdatasync writes too when it does (it is needed to read
                # the data back).
                self._sys.fdatasync(self._wal_fd)
                self.fsync_seconds.observe(time.perf_counter() - started)
        except BaseException as e:
            self._failed = e
            raise
        # A fresh buffer, not clear(): a traceback may still hold a view of the old one.
        self._pending = bytearray()
        self.fsyncs += 1

    def close(self) -> None:
        """Sync what is pending (a clean shutdown loses nothing), release files."""
        if self._closed:
            return
        try:
            if self._failed is None and self._state is not None:
                self.sync()
        finally:
            self._release()

    # -- extras

    def simulate_crash(self) -> None:
        """Release the files without writing what is pending: what a process
        killed at this point leaves on disk (crash tests)."""
        if not self._closed:
            self._pending = bytearray()
            self._open_record = self._open_hard_state = None
            self._release()

    @property
    def wal_bytes(self) -> int:
        """Size of the WAL including records not yet synced."""
        if self._failed is None and not self._closed:
            self._frame_open_records()
        return self._wal_end

    # -- internals: lifecycle

    def _acquire_lock(self) -> int:
        path = os.path.join(self.directory, self.LOCK_NAME)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                log.error("storage {directory} is locked by another process", directory=self.directory)
                raise StorageLocked(f"{self.directory} is in use by another process") from e
            raise
        return fd

    def _release(self) -> None:
        self._closed = True
        if self._wal_fd is not None:
            fd, self._wal_fd = self._wal_fd, None
            os.close(fd)
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            os.close(fd)  # closing the descriptor drops the flock

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise StorageFailed(
                f"storage {self.directory} failed earlier: {self._failed!r}"
            ) from self._failed
        if self._closed:
            raise StorageClosed(f"storage {self.directory} is closed")

    def _loaded_state(self) -> _LogState:
        self._check_usable()
        if self._state is None:
            try:
                self._state = self._recover()
            except BaseException as e:
                # Unusable until the cause is fixed: let go of the files (and
                # the lock) now so an operator or a retry can get at them.
                self._failed = e
                self._release()
                raise
        return self._state

    # -- internals: recovery

    def _recover(self) -> _LogState:
        for name in (self.WAL_NAME, self.SNAPSHOT_NAME):
            tmp = os.path.join(self.directory, name + self._TMP_SUFFIX)
            if os.path.exists(tmp):
                # A crash before the rename: the old file is still the truth.
                log.info("removing unfinished {tmp}", tmp=tmp)
                self._sys.unlink(tmp)
        snapshot = self._read_snapshot_file()
        with self._snapshot_lock:
            self._written_snapshot_index = snapshot.meta.index if snapshot is not None else 0
        if not os.path.exists(self._wal_path):
            if snapshot is not None:
                raise StorageCorrupt(f"{self._wal_path}: missing although a snapshot exists")
            self._replace_file(self._wal_path, WAL_MAGIC)
        with open(self._wal_path, "rb") as f:
            data = f.read()
        content_end = len(data.rstrip(b"\0"))
        state, valid_end = self._replay_wal(data, snapshot, content_end)
        self._wal_fd = self._sys.open(self._wal_path, os.O_WRONLY)
        self._wal_allocated = len(data)
        if valid_end < content_end:
            log.warn(
                "{path}: torn record at offset {offset} ({dropped} bytes, a crash mid-write); truncating",
                path=self._wal_path,
                offset=valid_end,
                dropped=content_end - valid_end,
            )
            # No fsync: were this truncation lost, replay would find the same
            # torn tail and cut it again, and the next sync's fdatasync of
            # this file (which writes a changed size) makes it durable with
            # whatever follows (``dev.py mutants``
            # found the fsync that stood here changed nothing a test sees).
            self._sys.ftruncate(self._wal_fd, valid_end)
            self._wal_allocated = valid_end
        os.lseek(self._wal_fd, valid_end, os.SEEK_SET)
        self._wal_end = valid_end
        return state

    def _read_snapshot_file(self) -> Snapshot | None:
        try:
            with open(self._snapshot_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        # Written atomically, so any defect here is corruption, never a torn write.
        if data[:_HEADER_LEN] != SNAPSHOT_MAGIC:
            raise StorageCorrupt(f"{self._snapshot_path}: bad header at offset 0")
        payload = _read_record(memoryview(data), _HEADER_LEN)
        if payload is None or _HEADER_LEN + _FRAME.size + len(payload) != len(data):
            raise StorageCorrupt(f"{self._snapshot_path}: corrupt record at offset {_HEADER_LEN}")
        try:
            return Snapshot.from_wire(cbor2.loads(payload))
        except (cbor2.CBORDecodeError, KeyError, TypeError, ValueError) as e:
            raise StorageCorrupt(
                f"{self._snapshot_path}: undecodable snapshot at offset {_HEADER_LEN}: {e}"
            ) from e

    def _replay_wal(self, data: bytes, snapshot: Snapshot | None, content_end: int) -> tuple[_LogState, int]:
        """Rebuild the state from the WAL; returns it and the end of the last
        valid record (the file is cut there if anything but zeros follows).
        ``content_end``: where the zeros at the end of ``data`` begin."""
        path = self._wal_path
        if data[:_HEADER_LEN] in _OLD_WAL_MAGICS:
            raise StorageCorrupt(
                f"{path}: written in WAL format {data[_HEADER_LEN - 1]}, which this version does not read "
                f"(format {WAL_MAGIC[-1]}); start this node from an empty data directory"
            )
        if data[:_HEADER_LEN] != WAL_MAGIC:
            # The header is written with the file, atomically: never torn.
            raise StorageCorrupt(f"{path}: bad header at offset 0")
        buf = memoryview(data)
        state = _LogState()
        pos = _HEADER_LEN
        while pos < len(buf):
            payload = _read_record(buf, pos)
            if payload is None:
                if pos >= content_end:
                    break  # zeros to the end: the preallocated rest of the file
                following = _next_valid_record(buf, pos + 1, content_end)
                if following is not None:
                    raise StorageCorrupt(
                        f"{path}: corrupt record at offset {pos} followed by a valid record at offset "
                        f"{following}; refusing to drop what may be acknowledged entries"
                    )
                break
            try:
                self._apply_record(state, cbor2.loads(payload), pos)
            except StorageCorrupt:
                raise
            except (cbor2.CBORDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
                raise StorageCorrupt(f"{path}: undecodable record at offset {pos}: {e}") from e
            pos += _FRAME.size + len(payload)
        base = state.snapshot_meta
        if snapshot is None:
            if base.index:
                raise StorageCorrupt(f"{path}: follows a snapshot at index {base.index} but there is none")
        elif base.index > snapshot.meta.index or (
            base.index == snapshot.meta.index and base.term != snapshot.meta.term
        ):
            raise StorageCorrupt(
                f"{path}: follows snapshot ({base.index}, term {base.term}) but the snapshot file holds "
                f"({snapshot.meta.index}, term {snapshot.meta.term})"
            )
        elif base.index == snapshot.meta.index:
            state.snapshot = snapshot  # the WAL was compacted against this very snapshot
        else:
            # A crash after the snapshot was written, before the WAL was
            # compacted: the WAL is complete up to the snapshot, apply it now.
            state.save_snapshot(snapshot)
        return state, pos

    def _apply_record(self, state: _LogState, record: Any, pos: int) -> None:
        kind = record["t"]
        if kind == "e":
            first = record["i"]
            if type(first) is not int:
                raise ValueError(f"first index must be an integer, got {first!r}")
            entries = entries_from_columns(first, record["et"], record["ed"], record.get("ek"))
            try:
                state.append(state.check_append(entries))
            except ValueError as e:
                raise StorageCorrupt(
                    f"{self._wal_path}: inconsistent entries record at offset {pos}: {e}"
                ) from e
            if "h" in record:
                state.hard_state = self._hard_state_of(record)
        elif kind == "h":
            state.hard_state = self._hard_state_of(record)
        elif kind == "b":
            if pos != _HEADER_LEN:
                raise StorageCorrupt(f"{self._wal_path}: base record at offset {pos}, not first")
            # Only the meta matters while replaying; the snapshot file has the data.
            state.snapshot = Snapshot(SnapshotMeta.from_wire(record["meta"]), b"")
        else:
            raise StorageCorrupt(f"{self._wal_path}: unknown record type {kind!r} at offset {pos}")

    @staticmethod
    def _hard_state_of(record: dict[str, Any]) -> HardState:
        hs = HardState.from_wire(record["h"])
        if hs.vote is not None and not isinstance(hs.vote, int):
            raise ValueError(f"vote must be an integer, got {hs.vote!r}")
        return hs

    # -- internals: writing

    def _close_record(self) -> None:
        """Frame the open entries record, with the pending hard state if any."""
        if self._open_record is not None:
            record, self._open_record = self._open_record, None
            if self._open_hard_state is not None:
                record["h"], self._open_hard_state = self._open_hard_state, None
            self._frame_record(record)

    def _frame_open_records(self) -> None:
        self._close_record()
        if self._open_hard_state is not None:
            hard_state, self._open_hard_state = self._open_hard_state, None
            self._frame_record({"t": "h", "h": hard_state})

    def _frame_record(self, record: dict[str, Any]) -> None:
        frame = _frame(self._wal_end, cbor2.dumps(record))
        self._pending += frame
        self._wal_end += len(frame)

    def _make_room(self, nbytes: int) -> None:
        """Preallocate the WAL so the next ``nbytes`` land inside the file."""
        assert self._wal_fd is not None
        written = self._wal_end - nbytes  # the file position: records before the pending ones
        if not self._preallocate or written + nbytes <= self._wal_allocated:
            return
        chunk = self._preallocate
        size = (written + nbytes + chunk - 1) // chunk * chunk
        try:
            self._sys.fallocate(self._wal_fd, self._wal_allocated, size - self._wal_allocated)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            log.info(
                "{path}: the file system cannot preallocate ({error}); the WAL grows by appends",
                path=self._wal_path,
                error=e,
            )
            self._preallocate = 0
            return
        self._wal_allocated = size

    def _write_all(self, fd: int, data: bytes | bytearray) -> None:
        view = memoryview(data)
        while view:
            written = self._sys.write(fd, view)
            if written <= 0:  # never seen on a regular file, but never spin either
                raise OSError(f"write to {self.directory} made no progress")
            view = view[written:]

    def _write_snapshot_file(self, snapshot: Snapshot) -> None:
        # The payload is the CBOR of ``snapshot.to_wire()``, built around the
        # state rather than through it: the (maybe large) data is written as
        # it is and its CRC taken in place, never copied in memory (a copy
        # holds the GIL, which ``write_snapshot`` in a thread must not).
        data = snapshot.data
        head = cbor2.dumps({"meta": snapshot.meta.to_wire(), "data": b""})
        if not head.endswith(b"\x40"):  # pragma: no cover - cbor2 encodes empty bytes as 0x40
            raise AssertionError("unexpected encoding of the snapshot's head")
        pieces = [head[:-1] + _cbor_bytes_head(len(data)), data]
        self._replace_file(self._snapshot_path, [SNAPSHOT_MAGIC, *_frame_pieces(_HEADER_LEN, pieces)])

    def _compact_wal(self, state: _LogState) -> None:
        """Rewrite the WAL as base + hard state + the entries after the
        snapshot. Everything pending was synced before, so nothing is lost."""
        out = bytearray(WAL_MAGIC)

        def put(record: dict[str, Any]) -> None:
            out.extend(_frame(len(out), cbor2.dumps(record)))

        put({"t": "b", "meta": state.snapshot_meta.to_wire()})
        if state.hard_state != HardState():
            put({"t": "h", "h": state.hard_state.to_wire()})
        for i in range(0, len(state.entries), _ENTRIES_PER_COMPACTED_RECORD):
            chunk = state.entries[i : i + _ENTRIES_PER_COMPACTED_RECORD]
            terms, datas = entries_to_columns(chunk)
            record = {"t": "e", "i": chunk[0].index, "et": terms, "ed": datas}
            kinds = kinds_column(chunk)
            if kinds is not None:
                record["ek"] = kinds
            put(record)
        self._replace_file(self._wal_path, bytes(out))
        old_fd, self._wal_fd = self._wal_fd, None
        if old_fd is not None:
            self._sys.close(old_fd)
        self._wal_fd = self._sys.open(self._wal_path, os.O_WRONLY)
        os.lseek(self._wal_fd, len(out), os.SEEK_SET)
        self._wal_end = self._wal_allocated = len(out)
        log.debug(
            "{path}: compacted to {n} entries after snapshot {index}",
            path=self._wal_path,
            n=len(state.entries),
            index=state.snapshot_meta.index,
        )

    def _replace_file(self, path: str, data: bytes | list[bytes]) -> None:
        """Atomically make ``path`` hold ``data`` (or its pieces, in order):
        temp file, fsync, rename, fsync the directory (so the rename itself
        survives a power loss)."""
        tmp = path + self._TMP_SUFFIX
        fd = self._sys.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            for piece in [data] if isinstance(data, bytes) else data:
                self._write_all(fd, piece)
            if self._fsync:
                self._sys.fsync(fd)
        finally:
            self._sys.close(fd)
        self._sys.replace(tmp, path)
        if self._fsync:
            self._fsync_directory()

    def _fsync_directory(self) -> None:
        fd = self._sys.open(self.directory, os.O_RDONLY)
        try:
            self._sys.fsync(fd)
        finally:
            self._sys.close(fd)
