# -*- test-case-name: tests.test_sync_folders,tests.test_hash_cache,tests.test_sync_process -*-
"""``surfshard sync BASEDIR``: keep a folder in sync with the cluster, with
SurfStore's semantics.

A folder holds regular files, in subfolders at any depth, and
``index.txt``, one line ``name,version,h1 h2 ...`` per file (a file in a
subfolder is named by its path, ``docs/plan.txt``): the state both sides
agreed on at the last sync (``0`` alone for a deleted file, nothing after
the comma for an empty one). A sync compares, per name, the folder (hashed
in blocks of ``block_size``), the index and the server:

- the server moved on (its version is not the index's): its version wins.
  If the folder also changed since the index, the local edit is kept beside
  it as ``NAME (conflicted copy HOST YYYY-MM-DD HHMMSS).EXT`` (as Dropbox
  names them) and uploaded as a file of its own, never lost; the server's
  content (or deletion) is then written;
- only the folder changed: its blocks go to the block stores (only those
  they lack), then ``updatefile`` at the index's version + 1 (a deletion
  is the tombstone ``["0"]``). If another client got there first, that is
  a conflict, handled as above;
- where the folder already matches the server (a sync killed after doing
  the work and before writing the index), the index just catches up.

Crash safety: files are written to a temporary file in the folder and
renamed into place; ``index.txt`` is replaced the same way, and only ever
records what is already true on both sides, so a sync killed at any point
(kill -9 included) leaves every file whole under its name and the next
sync finishes the job (the last rule above). Leftover temporary files are
removed by the next sync.

Incremental: beside ``index.txt`` the folder keeps ``.surfshard-cursor``,
where the cluster's change feed stood at the last sync (``client.feed``).
A re-sync asks only for what changed since (O(shards) calls when nothing
did) and takes the index as the server's state at the cursor; a cursor that
cannot be followed (the feed was compacted past it, or it is another
cluster's) makes the sync list everything, as the first one does. The
cursor is written after the index, so it never claims more than the index
holds. ``--watch`` waits on the feed (a long poll) and on the operating
system's news of the folder (``client.watch``) between syncs, so a change
made elsewhere arrives at once, and one made here goes up at once, rather
than at the next interval.

A folder's ``.surfshard-ignore`` names what it does not sync, with the
rules of a ``.gitignore`` (``Ignore``): out of sight both ways, so never sent, fetched or deleted. Changing the
rules costs one listing (the cursor records them), since a change the old
rules hid may lie past the cursor.

A re-sync hashes only the files that changed since the last one
(``HashCache``, kept in ``.surfshard-hashes``). Both ways only what
differs crosses the network: an upload sends only the blocks the stores
lack, and a download takes from the folder every block it already holds
(in the file's old version, or in any other file), checked against its
hash as it is read, and fetches only the rest.

A file whose blocks no block store can give (they were lost, or its
metadata was written by ``surfshard put`` with made-up hashes) does not hold
up the rest: it is left as it is and out of the index, reported as not
synced (the command exits 1), and written down in ``.surfshard-pending``,
so the next sync asks the server for it by name and tries it again (the
cursor moves on: one file left behind does not make every later sync
list everything once the feed has moved past it).

What a sync replaces or deletes because of a change made elsewhere is
kept for a while in ``.surfshard-versions`` (``Versions``).

Names that cannot be synced are reported and skipped: names with ``,``
(the index's separator), the sync's own files (``index.txt``,
``.surfshard-cursor``, ``.surfshard-hashes``, ``.surfshard-pending``, and
the folder ``.surfshard-versions``, at the top of the folder), names that
are not valid UTF-8 or too long, and anything that is not a
regular file or a folder (symlinks are never followed). A name from the
server is written only as a plain relative path (no ``..``, no empty or
``.`` part) under folders that are real folders here, never through a
symlink; a file whose place is taken by a folder (or a folder's by a file)
is reported as not synced, as above, until one of them is renamed. Empty
folders are not synced: a folder that a deletion from the server leaves
empty is removed (as git does), and one emptied here is left as it is.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import errno
import functools
import hashlib
import os
import re
import shutil
import socket
import stat
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import cbor2
import pathspec
from twisted.internet import defer, threads

from surfshard import errors
from surfshard.keyspace import TOMBSTONE, validate_filename

if TYPE_CHECKING:
    from client.cluster import ClusterClient

__all__ = ["INDEX_NAME", "IndexFileError", "SyncResult", "sync_folder"]

INDEX_NAME = "index.txt"
#: Where the change feed stood at the last sync (see the module docstring).
CURSOR_NAME = ".surfshard-cursor"
#: The block hashes of the folder's files as of the last sync, with what
#: ``stat`` said of each then (``HashCache``).
HASH_CACHE_NAME = ".surfshard-hashes"
#: Files the last sync had to leave behind (``SyncResult.incomplete``), one
#: name a line: the next sync asks the server for them by name, since the
#: cursor has moved past their change.
PENDING_NAME = ".surfshard-pending"
#: At most this many names are kept pending; past it the cursor stays where
#: it was instead (the next sync then hears of every change since).
MAX_PENDING = 1000
#: Patterns of names this folder does not sync, one a line (``Ignore``).
IGNORE_NAME = ".surfshard-ignore"
#: Where a file that a sync replaced or deleted, because of a change made
#: elsewhere, is kept for a while (``Versions``; Syncthing's ``.stversions``).
VERSIONS_NAME = ".surfshard-versions"
DEFAULT_KEEP_VERSIONS_DAYS = 30.0
MAX_KEEP_VERSIONS_DAYS = 3650.0
#: The sync's own files (and its folder of earlier versions), never synced.
OWN_FILES = (INDEX_NAME, CURSOR_NAME, HASH_CACHE_NAME, PENDING_NAME, IGNORE_NAME, VERSIONS_NAME)
DEFAULT_BLOCK_SIZE = 4096
#: Temporary files of an unfinished write (never synced; removed on start).
TMP_PREFIX = ".surfshard-tmp-"
#: Deepest a synced file may lie (folders in the path, the file included).
MAX_DEPTH = 64
#: Longest part of a path (a file or folder name): what file systems take.
MAX_PART_BYTES = 255
#: How many files one batch of downloads or uploads holds in memory at most.
BATCH_BYTES = 64 * 1024 * 1024
#: updatefile calls in flight at once.
CONCURRENCY = 64
TOMB = [TOMBSTONE]
_HASH = re.compile(r"[0-9a-f]{64}")

Hashes = list[str]


class IndexFileError(Exception):
    """``index.txt`` cannot be read; nothing in the folder was touched."""


class IgnorePatternError(ValueError):
    """A line of ignore rules that is no pattern (``Ignore``)."""


@dataclass
class SyncResult:
    uploaded: list[str] = field(default_factory=list)
    downloaded: list[str] = field(default_factory=list)
    deleted_local: list[str] = field(default_factory=list)
    deleted_remote: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    #: Names matched by the folder's ``.surfshard-ignore``, here or on the
    #: server: neither sent, fetched nor deleted.
    ignored: int = 0
    #: Files this sync could not bring here (their blocks are on no block
    #: store that answers), and why: left as they were, and the next sync
    #: tries them again.
    incomplete: dict[str, str] = field(default_factory=dict)
    #: Bytes of the blocks sent, each once, and what went over the network
    #: for them: every store's copy (``block_replicas`` a block).
    bytes_up: int = 0
    bytes_sent: int = 0
    bytes_down: int = 0
    #: Bytes of downloaded files taken from blocks already in the folder
    #: instead of from the block stores.
    bytes_reused: int = 0
    #: How the server's side was learnt: "changes" (since the cursor) or
    #: "listing" (everything), and why a cursor was not followed.
    remote_from: str = ""
    cursor_note: str = ""
    #: Only planned: the lists say what a sync would do, nothing was done.
    dry_run: bool = False
    #: Where files this sync replaced or deleted were kept (under
    #: ``VERSIONS_NAME``), and how many kept too long it removed.
    versions_kept: list[str] = field(default_factory=list)
    versions_removed: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "uploaded": len(self.uploaded),
            "downloaded": len(self.downloaded),
            "deleted_local": len(self.deleted_local),
            "deleted_remote": len(self.deleted_remote),
            "conflicts": self.conflicts,
            "skipped": self.skipped,
            "ignored": self.ignored,
            "incomplete": self.incomplete,
            "bytes_up": self.bytes_up,
            "bytes_sent": self.bytes_sent,
            "bytes_down": self.bytes_down,
            "bytes_reused": self.bytes_reused,
            "remote_from": self.remote_from,
            "dry_run": self.dry_run,
            "versions_kept": self.versions_kept,
            "versions_removed": self.versions_removed,
        }


# -- the index -------------------------------------------------------------------


def read_index(path: Path) -> dict[str, tuple[int, Hashes]]:
    """``index.txt`` as ``{name: (version, hashes)}``; ``IndexFileError`` with
    the line at fault if it is not one."""
    if not path.exists():
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise IndexFileError(f"{path}: cannot read it: {e}") from None
    out: dict[str, tuple[int, Hashes]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(",")
        if len(parts) != 3:
            raise IndexFileError(f"{path}:{number}: expected name,version,hashes, got {line[:80]!r}")
        name, version_text, hashes_text = parts
        try:
            version = int(version_text)
            if version < 1:
                raise ValueError
        except ValueError:
            raise IndexFileError(
                f"{path}:{number}: version {version_text[:20]!r} is not an integer >= 1"
            ) from None
        hashes = hashes_text.split()
        if hashes != TOMB and not all(_HASH.fullmatch(h) for h in hashes):
            raise IndexFileError(f"{path}:{number}: {hashes_text[:80]!r} is not a list of block hashes")
        if not name or name in out:
            raise IndexFileError(f"{path}:{number}: {'empty' if not name else 'repeated'} name {name!r}")
        out[name] = (version, hashes)
    return out


def write_index(path: Path, index: dict[str, tuple[int, Hashes]]) -> None:
    lines = [f"{name},{version},{' '.join(hashes)}\n" for name, (version, hashes) in sorted(index.items())]
    write_atomically(path, "".join(lines).encode("utf-8"))


def write_atomically(
    path: Path, data: bytes | Iterator[bytes], *, fsync: bool = True, durable_name: bool = False
) -> None:
    """Write ``data`` to ``path`` whole or not at all: a temporary file
    beside it (synced with ``fsync``), renamed over it; with
    ``durable_name`` the folder is synced too, so the rename survives a
    power cut."""
    with atomic_file(path, fsync=fsync, durable_name=durable_name) as f:
        for piece in [data] if isinstance(data, bytes) else data:
            f.write(piece)


@contextlib.contextmanager
def atomic_file(path: Path, *, fsync: bool = True, durable_name: bool = False) -> Iterator[BinaryIO]:
    """``write_atomically`` for a writer that produces its data in steps:
    the file the block writes to is renamed over ``path`` when the block
    ends, and removed instead if it raises."""
    tmp = path.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if durable_name:
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


# -- the folder ------------------------------------------------------------------


def syncable(name: str) -> str | None:
    """Why ``name`` (a path relative to the folder, ``/`` between its
    parts) cannot be synced, or None."""
    if name in OWN_FILES:
        return "the sync's own file"
    if name.startswith(VERSIONS_NAME + "/"):
        return "in the sync's folder of earlier versions"
    if "," in name:
        return "contains ',' (the index's separator)"
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "not a relative path of plain names"
    if len(parts) > MAX_DEPTH:
        return f"more than {MAX_DEPTH} folders deep"
    try:
        if any(part.startswith(TMP_PREFIX) for part in parts):
            return "named like the sync's temporary files"
        if any(len(part.encode("utf-8")) > MAX_PART_BYTES for part in parts):
            return f"a part of it is longer than {MAX_PART_BYTES} bytes"
        validate_filename(name)
    except (UnicodeEncodeError, errors.BadRequest) as e:
        return f"not a valid name: {e}"
    return None


class Ignore:
    """The folder's ``.surfshard-ignore``, read as a ``.gitignore`` is
    (``pathspec``'s implementation of git's rules): a pattern a line, ``#``
    starts a comment, ``!`` takes a name back, ``**`` spans folders. A
    pattern without ``/`` (but a trailing one) matches that name at any
    depth (``*.log``, ``node_modules``); one with ``/`` matches the path
    from the top (``docs/*.pdf``: not ``docs/old/a.pdf``); a trailing ``/``
    matches folders only (``build/``). As in git, nothing in an ignored
    folder can be taken back: the folder is not read at all.
    What the rules match is not synced either way: not sent, not fetched,
    and never deleted, on either side, because it is out of sight here (its
    index entry, if it had one, stays as it was)."""

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        # Blank ends are dropped (git keeps a leading blank; a stray space
        # that silently stops a rule from matching helps no one here).
        lines = [line.strip() for line in patterns]
        #: The rules in order (order matters: a later ``!`` takes back).
        self.rules = [line for line in lines if line and not line.startswith("#")]
        try:
            self._spec = pathspec.GitIgnoreSpec.from_lines(self.rules)
        except Exception:  # pathspec's own error, or re.error from a [range]
            for number, line in enumerate(lines, 1):
                if line and not line.startswith("#"):
                    try:
                        pathspec.GitIgnoreSpec.from_lines([line])
                    except Exception as e:
                        raise IgnorePatternError(f"line {number}: {line!r} is not a pattern ({e})") from None
            raise

    @classmethod
    def of(cls, base: Path) -> Ignore:
        try:
            return cls((base / IGNORE_NAME).read_text(encoding="utf-8").splitlines())
        except FileNotFoundError:
            return cls()
        except (OSError, UnicodeDecodeError) as e:
            raise IndexFileError(f"{base / IGNORE_NAME}: cannot read it: {e}") from None
        except IgnorePatternError as e:
            raise IndexFileError(f"{base / IGNORE_NAME}: {e}") from None

    def __bool__(self) -> bool:
        return bool(self.rules)

    @property
    def digest(self) -> str:
        """Names the rules (empty without any): kept with the cursor, since
        a cursor followed under other rules would miss what they hid."""
        if not self:
            return ""
        return hashlib.sha256("\n".join(self.rules).encode("utf-8")).hexdigest()[:16]

    def __call__(self, name: str, *, is_dir: bool = False, folders_checked: bool = False) -> bool:
        """Whether ``name`` (a path in the folder; ``is_dir``: a folder's) or
        a folder it is in is ignored. ``folders_checked``: the folders it is
        in are known not to be (the scan checked each on its way down), so
        only its own name is."""
        if not self:
            return False
        match = self._spec.match_file
        if not folders_checked:
            # Every folder on the way first, as the scan meets them: a name
            # the scan cannot see must never count as missing here.
            end = name.find("/")
            while end != -1:
                if match(name[: end + 1]):
                    return True
                end = name.find("/", end + 1)
        return bool(match(name + "/" if is_dir else name))


def read_cursor_file(path: Path) -> tuple[str, str]:
    """``(cursor text, ignore rules' digest)`` from ``.surfshard-cursor``
    (``("", "")`` if there is none): the cursor's line, then ``ignore
    DIGEST`` when the folder had rules."""
    lines = path.read_text(encoding="ascii").splitlines()
    cursor = lines[0].strip() if lines else ""
    rules = next((line[len("ignore ") :].strip() for line in lines[1:] if line.startswith("ignore ")), "")
    return cursor, rules


def _in_folder(base: Path, name: str) -> bool:
    """Whether every folder ``name`` lies in is a real folder under ``base``
    (none missing, none a symlink)."""
    return _folders(base, name, make=False) is None


def _remove_emptied_folders(base: Path, name: str) -> None:
    """Remove the folders ``name`` lay in that its deletion left empty,
    deepest first (as git does on checkout): ``rmdir`` takes only an empty
    folder, so nothing else is lost, and ``base`` itself stays."""
    parts = name.split("/")[:-1]
    while parts:
        try:
            os.rmdir(base.joinpath(*parts))
        except OSError:
            return  # not empty (or gone): its parents are not empty either
        parts.pop()


def _is_file_or_link(path: Path) -> bool:
    try:
        return not stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _make_folders(base: Path, name: str) -> str | None:
    """Make the folders ``name`` lies in, under ``base``; why not, or None.
    Each must be a real folder (never a symlink: a write must not leave
    the synced folder) or be made here."""
    return _folders(base, name, make=True)


def _folders(base: Path, name: str, *, make: bool) -> str | None:
    """Why the folders ``name`` lies in are not all real folders under
    ``base``, or None; with ``make``, missing ones are made."""
    directory = base
    parts = name.split("/")[:-1]
    for i, part in enumerate(parts):
        directory = directory / part
        try:
            mode = os.lstat(directory).st_mode
        except FileNotFoundError:
            if not make:
                return f"{'/'.join(parts[: i + 1])} is not here"
            try:
                os.mkdir(directory)
            except OSError as e:
                return f"cannot make the folder {'/'.join(parts[: i + 1])}: {e.strerror or e}"
            continue
        except OSError as e:
            return f"cannot look at {'/'.join(parts[: i + 1])}: {e.strerror or e}"
        if not stat.S_ISDIR(mode):
            what = "a symlink" if stat.S_ISLNK(mode) else "a file"
            return f"{'/'.join(parts[: i + 1])} is {what} here, not a folder"
    return None


def hash_file(path: str | Path, block_size: int) -> Hashes:
    sha256 = hashlib.sha256
    with open(path, "rb") as f:
        data = f.read(block_size)
        if len(data) < block_size:  # most files: one block or none
            return [sha256(data).hexdigest()] if data else []
        hashes = [sha256(data).hexdigest()]
        while chunk := f.read(block_size):
            hashes.append(sha256(chunk).hexdigest())
    return hashes


class HashCache:
    """The folder's block hashes from the last sync, so a re-sync hashes
    only files that changed (git's index does the same for ``git status``).

    A file's hashes are reused only when its size, inode, modification and
    change times are what they were, and both times are more than a second
    older than the cache itself: a file written in the same second as the
    cache (the "racy" case) is hashed again, since a coarse clock could
    hide a later write. The change time cannot be set by a program, so a
    tool that restores modification times does not fool it either.
    Anything wrong with the file makes an empty cache: it is only ever an
    optimisation."""

    #: Times within this of the cache's own write are not trusted.
    RACY_NS = 1_000_000_000

    def __init__(self, path: Path, block_size: int) -> None:
        self.path = path
        self.block_size = block_size
        self.old: dict[str, list[Any]] = {}
        self.written_ns = 0
        self.new: dict[str, list[Any]] = {}
        try:
            data = cbor2.loads(path.read_bytes())
            if (
                type(data) is dict
                and data.get("v") == 1
                and data.get("block_size") == block_size
                and type(data.get("written_ns")) is int
                and type(data.get("files")) is dict
            ):
                self.old, self.written_ns = data["files"], data["written_ns"]
        except (OSError, ValueError, cbor2.CBORDecodeError, TypeError, RecursionError):
            pass

    @staticmethod
    def key(st: os.stat_result) -> list[int]:
        return [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]

    def lookup(self, name: str, st: os.stat_result) -> Hashes | None:
        entry = self.old.get(name)
        if type(entry) is not list or len(entry) != 5 or entry[:4] != self.key(st):
            return None
        trusted_before = self.written_ns - self.RACY_NS
        if st.st_mtime_ns >= trusted_before or st.st_ctime_ns >= trusted_before:
            return None
        hashes = entry[4]
        if type(hashes) is not list or not all(type(h) is str and len(h) == 64 for h in hashes):
            return None
        return hashes

    def remember(self, name: str, st: os.stat_result, hashes: Hashes) -> None:
        self.new[name] = [*self.key(st), hashes]

    def save(self) -> None:
        body = {"v": 1, "block_size": self.block_size, "written_ns": time.time_ns(), "files": self.new}
        with contextlib.suppress(OSError):
            write_atomically(self.path, cbor2.dumps(body), fsync=False)


def scan(
    base: Path,
    block_size: int,
    result: SyncResult,
    cache: HashCache | None = None,
    ignore: Ignore | None = None,
) -> dict[str, Hashes]:
    """The folder's regular files and their block hashes (temporary files of
    an unfinished sync are removed); with a ``cache``, unchanged files are
    not hashed again; what ``ignore`` matches is left out (and counted)."""
    out: dict[str, Hashes] = {}
    # Folders still to read: (path prefix of their files, their path).
    # Bounded: symlinks are never followed and syncable() stops at MAX_DEPTH.
    pending: list[tuple[str, str]] = [("", str(base))]
    while pending:
        prefix, directory = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError as e:
            if not prefix:
                raise  # the folder itself
            result.skipped[prefix[:-1]] = f"folder cannot be read: {e.strerror or e}"
            continue
        for entry in entries:
            name = prefix + entry.name
            if entry.name.startswith(TMP_PREFIX):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                continue
            if name in OWN_FILES:
                continue
            if ignore and ignore(name, is_dir=_is_folder(entry), folders_checked=True):
                result.ignored += 1
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError as e:  # gone since the listing
                result.skipped[name] = f"cannot be read: {e.strerror or e}"
                continue
            mode = st.st_mode
            if stat.S_ISDIR(mode):
                # A folder's name is checked as a file in it would be.
                why = syncable(f"{name}/x")
                if why is not None:
                    result.skipped[name] = why
                else:
                    pending.append((name + "/", entry.path))
                continue
            if not stat.S_ISREG(mode):
                result.skipped[name] = "a symlink" if stat.S_ISLNK(mode) else "not a regular file"
                continue
            why = syncable(name)
            if why is not None:
                result.skipped[name] = why
                continue
            if cache is None:
                out[name] = hash_file(entry.path, block_size)
                continue
            hashes = cache.lookup(name, st)
            if hashes is None:
                hashes = hash_file(entry.path, block_size)
                if HashCache.key(os.stat(entry.path, follow_symlinks=False)) != HashCache.key(st):
                    # It changed while it was read: use what was read, and
                    # hash it again next time.
                    out[name] = hashes
                    continue
            out[name] = hashes
            cache.remember(name, st, hashes)
    return out


def _is_folder(entry: os.DirEntry[str]) -> bool:
    """Whether a listed entry is a folder (not through a symlink), from the
    listing's file type where the file system gives one."""
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False  # unreadable: the stat that follows reports it


def local_sources(local: dict[str, Hashes], wanted: set[str]) -> dict[str, tuple[str, int]]:
    """Where the folder (as ``scan`` found it) holds each ``wanted`` block:
    ``{hash: (name, block number)}``, the first place seen."""
    sources: dict[str, tuple[str, int]] = {}
    for name, hashes in local.items():
        for i, h in enumerate(hashes):
            if h in wanted and h not in sources:
                sources[h] = (name, i)
    return sources


def read_local_blocks(
    base: Path, sources: dict[str, tuple[str, int]], hashes: Iterable[str], block_size: int
) -> dict[str, bytes]:
    """``{hash: data}`` for the ``hashes`` that ``sources`` places in the
    folder, read there and each checked against its hash: a file changed,
    renamed or deleted since the scan (a conflict copy, a file this sync
    already rewrote) gives nothing for its blocks, which are then fetched."""
    by_file: dict[str, list[tuple[int, str]]] = {}
    for h in hashes:
        where = sources.get(h)
        if where is not None:
            by_file.setdefault(where[0], []).append((where[1], h))
    found: dict[str, bytes] = {}
    for name, blocks in by_file.items():
        try:
            with open(base / name, "rb") as f:
                for number, h in sorted(blocks):
                    f.seek(number * block_size)
                    data = f.read(block_size)
                    if hashlib.sha256(data).hexdigest() == h:
                        found[h] = data
        except OSError:
            continue  # gone or unreadable now: fetched instead
    return found


def conflict_name(name: str, when: datetime.datetime, host: str, taken: Callable[[str], bool]) -> str:
    return _name_beside(name, f" (conflicted copy {host} {when:%Y-%m-%d %H%M%S})", " {n}", taken)


def _name_beside(name: str, tag: str, numbered: str, taken: Callable[[str], bool]) -> str:
    """``name`` with ``tag`` after its stem (before the extension), and
    ``numbered`` (``{n}`` = 2, 3, ...) after that while the name is
    ``taken``. The stem gives way, a character at a time (so never in the
    middle of one), where the name would pass a name's longest."""
    folder, slash, leaf = name.rpartition("/")
    stem, dot, ext = leaf.rpartition(".")
    if not stem:  # no extension (or a dotfile)
        stem, dot, ext = leaf, "", ""
    room = MAX_PART_BYTES - len(f"{tag}{numbered.format(n=99)}{dot}{ext}".encode())
    while stem and len(stem.encode("utf-8", "surrogateescape")) > room:
        stem = stem[:-1]
    base = f"{folder}{slash}{stem}{tag}"
    candidate = f"{base}{dot}{ext}"
    n = 2
    while taken(candidate):  # bounded: each try is a new name
        candidate = f"{base}{numbered.format(n=n)}{dot}{ext}"
        n += 1
    return candidate


# -- earlier versions ------------------------------------------------------------

#: ``plan~20261207-013300.txt``, ``plan~20261207-013300-2.txt``: when the
#: file was replaced, in the name (its own times are its content's).
#: What ``os.link`` says where hard links cannot be made: a copy instead.
_NO_HARD_LINK = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK})
_VERSION_STAMP = re.compile(r"~(\d{8}-\d{6})(?:-\d+)?(?:\.[^.]*)?$")


def version_name(name: str, when: datetime.datetime, taken: Callable[[str], bool]) -> str:
    """Where ``name`` replaced at ``when`` is kept under ``VERSIONS_NAME``:
    ``docs/plan.txt`` -> ``docs/plan~20261207-013300.txt``."""
    return _name_beside(name, f"~{when:%Y%m%d-%H%M%S}", "-{n}", taken)


def parse_version_name(kept: str) -> tuple[str, datetime.datetime] | None:
    """``version_name`` read back: the file's name and when it was
    replaced, or None for a name that is no version."""
    stamp = _VERSION_STAMP.search(kept)
    if stamp is None:
        return None
    try:
        when = datetime.datetime.strptime(stamp.group(1), "%Y%m%d-%H%M%S")
    except ValueError:
        return None
    tail = stamp.group(0)
    ext = tail[tail.index(".") :] if "." in tail else ""
    return kept[: stamp.start()] + ext, when


class Versions:
    """A folder's earlier versions: a file that a sync replaces or deletes
    because of a change made elsewhere is first linked (a hard link: no
    copy, and no moment without the file under its name, which the next
    sync would take for a deletion here) into ``VERSIONS_NAME`` and kept
    ``keep_days`` days, so a deletion or an overwrite made on another
    machine, by mistake, can be undone from this one. Never synced; with
    ``keep_days`` 0 nothing is kept (and nothing there is removed)."""

    def __init__(self, base: Path, keep_days: float, now: Callable[[], datetime.datetime]) -> None:
        self.base = base
        self.root = base / VERSIONS_NAME
        self.keep_days = keep_days
        self.now = now

    def keep(self, name: str) -> str | None:
        """Keep the regular file ``name`` as it is now; where it was kept,
        or None (nothing to keep, or keeping is off). OSError if it could
        not be kept (the folder cannot be made or written)."""
        if self.keep_days <= 0:
            return None
        try:
            if not stat.S_ISREG(os.lstat(self.base / name).st_mode):
                return None
        except FileNotFoundError:
            return None
        kept = version_name(name, self.now(), lambda n: os.path.lexists(self.root / n))
        problem = _make_folders(self.base, f"{VERSIONS_NAME}/{kept}")
        if problem is not None:
            raise OSError(f"{VERSIONS_NAME}/{kept}: {problem}")
        try:
            os.link(self.base / name, self.root / kept, follow_symlinks=False)
        except OSError as e:
            if e.errno not in _NO_HARD_LINK:
                raise
            # A file system without hard links (or out of them for this
            # file): a copy does the same.
            shutil.copy2(self.base / name, self.root / kept, follow_symlinks=False)
        return kept

    def entries(self, name: str | None = None) -> list[tuple[str, datetime.datetime, str]]:
        """The versions kept, oldest first: ``(file name, when it was
        replaced, where it is kept under VERSIONS_NAME)``, of ``name`` only
        if given. Files there that are not versions are left out."""
        out: list[tuple[str, datetime.datetime, str]] = []
        if not self.root.is_dir() or self.root.is_symlink():
            return out
        for folder, _dirs, files in os.walk(self.root):  # symlinks not followed: bounded
            for leaf in files:
                kept = os.path.relpath(os.path.join(folder, leaf), self.root).replace(os.sep, "/")
                parsed = parse_version_name(kept)
                if parsed is not None and (name is None or parsed[0] == name):
                    out.append((parsed[0], parsed[1], kept))
        out.sort(key=lambda v: (v[1], v[2]))
        return out

    def restore(self, name: str, kept: str) -> str | None:
        """Put the version ``kept`` back under ``name``, whole or not at all;
        what was there first is kept as a version itself, so a restore can
        be undone the same way. Where that was kept, or None. The next sync
        sends the restored file as an edit made here."""
        why = syncable(name)
        if why is not None:
            raise OSError(f"{name}: {why}")
        source = self.root / kept
        if parse_version_name(kept) is None or not stat.S_ISREG(os.lstat(source).st_mode):
            raise OSError(f"{VERSIONS_NAME}/{kept} is not a kept version")
        problem = _make_folders(self.base, name)
        if problem is not None:
            raise OSError(f"{name}: {problem}")
        before = self.keep(name)
        with open(source, "rb") as f:
            write_atomically(self.base / name, iter(lambda: f.read(1024 * 1024), b""))
        return before

    def prune(self) -> int:
        """Remove the versions kept longer than ``keep_days`` (by the time
        in their names; other files there are left alone), and the folders
        that leaves empty. How many were removed."""
        if self.keep_days <= 0:
            return 0
        cutoff = self.now() - datetime.timedelta(days=self.keep_days)
        removed = 0
        for _name, when, kept in self.entries():
            if when < cutoff:
                with contextlib.suppress(OSError):
                    os.unlink(self.root / kept)
                    removed += 1
                _remove_emptied_folders(self.root, kept)
        return removed


# -- the sync --------------------------------------------------------------------


class Folder:
    """One sync of ``base`` against a cluster, driven from a thread that is
    not the reactor's (``client.blocking`` runs the reactor)."""

    def __init__(
        self,
        base: Path,
        reactor: Any,
        cluster_client: Any,
        blocks: Any,
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
        progress: Any = None,
        host: str | None = None,
        dry_run: bool = False,
        keep_versions_days: float = DEFAULT_KEEP_VERSIONS_DAYS,
    ) -> None:
        self.base = base
        self.reactor = reactor
        self.versions = Versions(base, keep_versions_days, datetime.datetime.now)
        #: Plan only: learn both sides, say what a sync would do, change
        #: nothing here or on the server.
        self.dry_run = dry_run
        self.client = cluster_client
        self.blocks = blocks
        self.block_size = block_size
        self.progress = progress
        self.host = (host or socket.gethostname().split(".")[0] or "host").replace(",", "_").replace("/", "_")
        self.result = SyncResult()
        self.index_path = base / INDEX_NAME
        self.cursor_path = base / CURSOR_NAME
        self.pending_path = base / PENDING_NAME
        #: Where the feed stands once this sync has learnt the server's side.
        self.cursor: Any = None
        #: Files were written without an fsync each (see ``_download``).
        self.wrote = False
        #: The folder's files and their blocks as this sync leaves them (the
        #: scan, then its conflict copies and downloads): where a download
        #: looks for blocks before fetching them.
        self.present: dict[str, Hashes] = {}
        #: The folder's ``.surfshard-ignore`` (read at the start of ``run``).
        self.ignore = Ignore()

    def _call(self, f: Callable[..., Any], *args: Any) -> Any:
        return threads.blockingCallFromThread(self.reactor, f, *args)

    def run(self) -> SyncResult:
        index = read_index(self.index_path)  # before touching anything
        before = dict(index)
        ignore = self.ignore = Ignore.of(self.base)
        cache = HashCache(self.base / HASH_CACHE_NAME, self.block_size)
        local = scan(self.base, self.block_size, self.result, cache, ignore)
        self.present = local  # kept up to date as this sync changes the folder
        remote = self._remote(index)
        downloads: dict[str, tuple[int, Hashes]] = {}
        uploads: dict[str, tuple[int, Hashes]] = {}
        for name in sorted(set(index) | set(local) | set(remote)):
            if ignore and name not in local and ignore(name):
                if name in remote and remote[name] != index.get(name):
                    self.result.ignored += 1  # the server's change, not taken
                continue
            if name not in local and syncable(name) is not None:
                self.result.skipped.setdefault(name, syncable(name) or "")
                continue
            mine = local.get(name)  # None: absent
            known = index.get(name)
            theirs = remote.get(name)
            known_v = known[0] if known else 0
            theirs_v = theirs[0] if theirs else 0
            mine_state = mine if mine is not None else TOMB
            known_state = known[1] if known else TOMB
            if theirs is not None and mine_state == theirs[1]:
                index[name] = theirs  # already alike (maybe a sync killed half-way)
                continue
            if theirs_v != known_v:
                if mine_state != known_state and mine is not None:
                    if self.dry_run:
                        self.result.conflicts.append(name)  # whose edit would be kept as a copy
                    else:
                        self._keep_conflict(name, local)
                downloads[name] = theirs if theirs is not None else (0, TOMB)
            elif mine_state != known_state:
                uploads[name] = (theirs_v + 1, mine_state)
        if self.dry_run:
            return self._planned(downloads, uploads, local)
        if self.progress is not None:
            work = {**downloads, **uploads}
            self.progress.plan(
                len(work), sum(len(h) for _, h in work.values() if h != TOMB) * self.block_size
            )
        self._download(downloads, index)
        self._upload(uploads, index, local)
        # Conflict copies made above are new files: send them now.
        if self.result.conflicts:
            fresh = {
                n: h
                for n, h in scan(self.base, self.block_size, SyncResult(), ignore=ignore).items()
                if n not in index
            }
            self._upload({n: (1, h) for n, h in fresh.items() if n in self.result.conflicts}, index, fresh)
        self.result.versions_removed = self.versions.prune()
        if index != before:
            if self.wrote:
                os.sync()  # the files the index is about to name are on disk first
            write_index(self.index_path, index)
        if self.cursor is not None and len(self.result.incomplete) <= MAX_PENDING:
            # After the index: the cursor never claims more than the index
            # holds, but for the files left behind, which the next sync asks
            # for by name; so they are written down before the cursor moves.
            if self.result.incomplete:
                pending = "".join(f"{name}\n" for name in sorted(self.result.incomplete))
                write_atomically(self.pending_path, pending.encode("utf-8"))
            else:
                with contextlib.suppress(FileNotFoundError):
                    self.pending_path.unlink()
            rules = f"ignore {self.ignore.digest}\n" if self.ignore else ""
            write_atomically(self.cursor_path, f"{self.cursor.encode()}\n{rules}".encode("ascii"))
        cache.save()
        return self.result

    def _planned(
        self,
        downloads: dict[str, tuple[int, Hashes]],
        uploads: dict[str, tuple[int, Hashes]],
        local: dict[str, Hashes],
    ) -> SyncResult:
        """The result of a dry run: what ``run`` would do with this plan. No
        index, cursor, pending list or hash cache is written."""
        result = self.result
        result.dry_run = True
        for name, (_version, hashes) in sorted(downloads.items()):
            if hashes != TOMB:
                result.downloaded.append(name)
            elif name in local:
                result.deleted_local.append(name)
        for name, (_version, hashes) in sorted(uploads.items()):
            (result.deleted_remote if hashes == TOMB else result.uploaded).append(name)
        return result

    def _remote(self, index: dict[str, tuple[int, Hashes]]) -> dict[str, tuple[int, Hashes]]:
        """The server's side: the index as of the last sync's cursor plus
        what changed since, or, without a cursor that can be followed, a
        listing of everything."""
        from client.feed import Cursor, CursorError, CursorExpired, changes_since, list_all

        try:
            text, rules = read_cursor_file(self.cursor_path)
        except FileNotFoundError:
            text = ""
        except (OSError, UnicodeDecodeError) as e:
            text, self.result.cursor_note = "", f"cursor file unreadable ({e}): listing everything"
        else:
            if text and rules != self.ignore.digest:
                # What the old rules hid changed unseen past the cursor.
                text, self.result.cursor_note = "", "the ignore rules changed: listing everything"
        if text:
            try:
                cursor = Cursor.decode(text, self.client.cluster)
                changes, self.cursor = self._call(changes_since, self.client, cursor)
            except (CursorError, CursorExpired) as e:
                self.result.cursor_note = f"{e.message}: listing everything"
            else:
                remote = {name: (v, list(h)) for name, (v, h) in index.items()}
                for name, (version, hashes) in changes.items():
                    if version > remote.get(name, (0, []))[0]:
                        remote[name] = (version, list(hashes))
                # What the last sync left behind, as the server has it now.
                pending = self._pending()
                for name, (version, hashes) in (self._call(self._infos, pending) if pending else {}).items():
                    if version:
                        remote[name] = (version, list(hashes))
                    else:
                        remote.pop(name, None)
                self.result.remote_from = "changes"
                return remote
        files, self.cursor = self._call(list_all, self.client)
        self.result.remote_from = "listing"
        return {name: (v, list(h)) for name, (v, h) in files.items()}

    def _pending(self) -> list[str]:
        """The names the last sync left behind (``PENDING_NAME``)."""
        try:
            text = self.pending_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return []
        return [name for name in text.splitlines()[:MAX_PENDING] if name and syncable(name) is None]

    @defer.inlineCallbacks
    def _infos(self, names: list[str]) -> Any:
        """``{name: (version, hashes)}`` from the server for ``names``, all
        asked at once (on the reactor)."""
        answers = yield defer.gatherResults([self.client.getfileinfo(n) for n in names], consumeErrors=True)
        return {name: (info[0], list(info[1])) for name, info in zip(names, answers, strict=True)}

    def _keep_conflict(self, name: str, local: dict[str, Hashes]) -> None:
        when = datetime.datetime.now()
        copy = conflict_name(name, when, self.host, lambda n: (self.base / n).exists() or n in local)
        os.replace(self.base / name, self.base / copy)
        if name in self.present:
            self.present[copy] = self.present.pop(name)
        self.result.conflicts.append(copy)

    def _replace(self, name: str, version: int, replace: Callable[[], object]) -> bool:
        """Replace (or delete) the file ``name`` by the server's ``version``
        with ``replace()``, keeping it among the earlier versions first.
        False if it could not be kept: then it is left as it is, reported
        and out of the index, and the next sync tries again, rather than
        lost. If ``replace()`` fails, the version goes again: its link would
        share the file still in place, so an edit there would change the
        "earlier" version too."""
        try:
            kept = self.versions.keep(name)
        except OSError as e:
            self.result.incomplete[name] = (
                f"version {version} not written: the file here could not be kept in "
                f"{VERSIONS_NAME} ({e.strerror or e})"
            )
            self._tick(name)
            return False
        try:
            replace()
        except BaseException:
            if kept is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.versions.root / kept)
            raise
        if kept is not None:
            self.result.versions_kept.append(kept)
            self.wrote = True  # the link is made durable with the downloads
        return True

    def _download(
        self, downloads: dict[str, tuple[int, Hashes]], index: dict[str, tuple[int, Hashes]]
    ) -> None:
        wanted = {h for _, hashes in downloads.values() if hashes != TOMB for h in hashes}
        sources = local_sources(self.present, wanted) if wanted else {}
        pending = collections.deque(sorted(downloads.items()))
        while pending:  # a batch at a time: bounded memory
            batch: list[tuple[str, tuple[int, Hashes]]] = []
            size = 0
            while pending and (not batch or size < BATCH_BYTES):
                name, info = pending.popleft()
                batch.append((name, info))
                size += len(info[1]) * self.block_size
            needed = {h for _, (_, hashes) in batch if hashes != TOMB for h in hashes}
            # Every file of the batch is read from before any is written.
            here = read_local_blocks(self.base, sources, needed, self.block_size) if sources else {}
            fetch = sorted(needed.difference(here))
            got, lost = self._call(self.blocks.get_available, fetch) if fetch else ({}, [])
            self.result.bytes_down += sum(len(d) for d in got.values())
            self.result.bytes_reused += sum(len(d) for d in here.values())
            got = {**got, **here}
            missing = set(lost)
            for name, (version, hashes) in batch:
                path = self.base / name
                absent = sum(1 for h in hashes if h in missing) if missing and hashes != TOMB else 0
                if absent:
                    # One file's blocks must not hold up the others: this
                    # one stays as it is (and out of the index), for the
                    # next sync to try again.
                    self.result.incomplete[name] = (
                        f"version {version} not downloaded: {absent} of its {len(hashes)} blocks "
                        "are on no block store that answers"
                    )
                    self._tick(name)
                    continue
                if hashes == TOMB:
                    # Only a file of this folder: not one a symlinked folder
                    # leads to, and never a folder.
                    if _in_folder(self.base, name) and _is_file_or_link(path):
                        if not self._replace(name, version, path.unlink):
                            continue
                        self.result.deleted_local.append(name)
                        _remove_emptied_folders(self.base, name)
                    self.present.pop(name, None)
                else:
                    problem = _make_folders(self.base, name)
                    if problem is None and os.path.isdir(path) and not path.is_symlink():
                        problem = "a folder of that name is in its place here"
                    if problem is not None:
                        self.result.incomplete[name] = f"version {version} not written: {problem}"
                        self._tick(name)
                        continue
                    # Made durable all at once before the index names them
                    # (``run``): one sync for the batch, not one per file.
                    write = functools.partial(write_atomically, path, (got[h] for h in hashes), fsync=False)
                    if not self._replace(name, version, write):
                        continue
                    self.present[name] = hashes
                    self.wrote = True
                    self.result.downloaded.append(name)
                if version:
                    index[name] = (version, hashes)
                else:
                    index.pop(name, None)
                self._tick(name)

    def _upload(
        self,
        uploads: dict[str, tuple[int, Hashes]],
        index: dict[str, tuple[int, Hashes]],
        local: dict[str, Hashes],
    ) -> None:
        names = collections.deque(sorted(uploads))
        while names:
            batch: list[str] = []
            size = 0
            while names and (not batch or size < BATCH_BYTES):
                name = names.popleft()
                batch.append(name)
                size += len(uploads[name][1]) * self.block_size
            blocks: dict[str, bytes] = {}
            for name in batch:
                version, hashes = uploads[name]
                if hashes == TOMB:
                    continue
                with open(self.base / name, "rb") as f:
                    for h in hashes:
                        data = f.read(self.block_size)
                        if hashlib.sha256(data).hexdigest() != h:
                            raise errors.Unavailable(f"{name} changed while it was being synced; sync again")
                        blocks[h] = data
            if blocks:
                stored = self.blocks.stored
                self.result.bytes_sent += self._call(self.blocks.put, blocks)
                self.result.bytes_up += self.blocks.stored - stored
            answers = self._call(self._commit_all, [(n, *uploads[n]) for n in batch])
            for name, answer in answers.items():
                version, hashes = uploads[name]
                if isinstance(answer, errors.VersionMismatch):
                    # Someone else got there first: their version wins, ours is a conflict copy.
                    if hashes != TOMB:
                        self._keep_conflict(name, local)
                    info = self._call(self.client.getfileinfo, name)
                    self._download({name: (info[0], list(info[1]))}, index)
                    continue
                if isinstance(answer, Exception):
                    raise answer
                index[name] = (version, hashes)
                (self.result.deleted_remote if hashes == TOMB else self.result.uploaded).append(name)
                self._tick(name)

    @defer.inlineCallbacks
    def _commit_all(self, items: list[tuple[str, int, Hashes]]) -> Any:
        """updatefile for every item, CONCURRENCY at a time; ``{name: version
        or the exception}`` (on the reactor)."""
        semaphore = defer.DeferredSemaphore(CONCURRENCY)
        answers: dict[str, Any] = {}

        def one(name: str, version: int, hashes: Hashes) -> defer.Deferred:
            d = semaphore.run(self.client.updatefile, name, version, hashes)
            d.addCallbacks(
                lambda v: answers.__setitem__(name, v), lambda f: answers.__setitem__(name, f.value)
            )
            return d

        yield defer.gatherResults([one(*item) for item in items])
        return answers

    def _tick(self, name: str) -> None:
        if self.progress is not None:
            self.progress.advance(name, self.result.bytes_up + self.result.bytes_down)


def sync_folder(
    base: str | os.PathLike[str],
    cluster: Any,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    progress: Any = None,
    timeout: float = 60.0,
    host: str | None = None,
    client: ClusterClient | None = None,
    dry_run: bool = False,
    keep_versions_days: float = DEFAULT_KEEP_VERSIONS_DAYS,
) -> SyncResult:
    """One sync of ``base`` against ``cluster`` (a ClusterConfig), blocking;
    with ``dry_run``, only what it would do (``Folder.dry_run``).

    ``client``: a ``ClusterClient`` on the blocking reactor to sync through
    (``watch`` keeps one for all its syncs); left open. Without it the sync
    makes its own, with ``timeout``, and closes it."""
    from client.blocking import _reactor
    from client.blocks import BlockClient
    from client.cluster import ClusterClient

    folder = Path(base)
    if not folder.is_dir():
        raise IndexFileError(f"{folder} is not a folder")
    if block_size < 1 or block_size > 4 * 1024 * 1024:
        raise ValueError("block size must be 1 byte .. 4 MiB")
    if not cluster.blockstores:
        raise errors.Unavailable(
            f"{cluster.source} has no [blockstores]: there is nowhere to keep file contents"
        )
    reactor = _reactor()
    syncing = client
    if syncing is None:
        syncing = threads.blockingCallFromThread(
            reactor, lambda: ClusterClient(cluster, reactor, timeout=timeout)
        )
    try:
        blocks = BlockClient(cluster, syncing.pool)
        return Folder(
            folder,
            reactor,
            syncing,
            blocks,
            block_size=block_size,
            progress=progress,
            host=host,
            dry_run=dry_run,
            keep_versions_days=keep_versions_days,
        ).run()
    finally:
        if client is None:  # ours: close it
            threads.blockingCallFromThread(reactor, syncing.close)


class TerminalProgress:
    """A bar of files and bytes on a terminal (``rich``)."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("sync"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("files, {task.fields[moved]}"),
            TimeRemainingColumn(),
            TextColumn("{task.description}"),
        )
        self.task: Any = None
        self.files = 0

    def plan(self, files: int, nbytes: int) -> None:
        if files:
            self.bar.start()
            self.task = self.bar.add_task("", total=files, moved="0 B")

    def advance(self, name: str, nbytes: int) -> None:
        if self.task is not None:
            from rich.filesize import decimal

            self.files += 1
            self.bar.update(self.task, completed=self.files, description=name[:40], moved=decimal(nbytes))

    def close(self) -> None:
        if self.task is not None:
            self.bar.stop()


def summary(result: SyncResult) -> str:
    if result.dry_run:
        return (
            f"dry run, nothing changed: would send {len(result.uploaded)}, fetch {len(result.downloaded)}, "
            f"delete here {len(result.deleted_local)}, delete there {len(result.deleted_remote)}, "
            f"conflicts {len(result.conflicts)}" + (f", {result.ignored} ignored" if result.ignored else "")
        )
    return (
        f"up {len(result.uploaded)}, down {len(result.downloaded)}, deleted here {len(result.deleted_local)}, "
        f"deleted there {len(result.deleted_remote)}, conflicts {len(result.conflicts)}, "
        f"{result.bytes_up} bytes up"
        + (f" ({result.bytes_sent} sent with every copy)" if result.bytes_sent > result.bytes_up else "")
        + f", {result.bytes_down} bytes down"
        + (f" ({result.bytes_reused} more found here)" if result.bytes_reused else "")
        + (f", {len(result.incomplete)} not synced" if result.incomplete else "")
        + (f", {result.ignored} ignored" if result.ignored else "")
        + (
            f", {len(result.versions_kept)} earlier version{'' if len(result.versions_kept) == 1 else 's'} "
            f"kept in {VERSIONS_NAME}"
            if result.versions_kept
            else ""
        )
    )
