"""The replicated SurfStore metadata state machine of one replica group.

Every replica applies the same committed commands in the same order, so
everything here is pure and deterministic: no clock, no randomness, no
iteration over unordered sets, and no exception ever escapes ``apply`` (a
replica must never crash on a committed entry: every replica would crash on
it, forever, on every restart).

The state is kept per shard, because a shard is the unit that moves between
groups: each shard holds its files ``name -> (version, hashlist)`` and its
dedup sessions, and ``export_shard``/``import_shard`` carry both.

Update rule (DESIGN.md "Metadata semantics"): ``updatefile`` succeeds only
when ``version == stored + 1`` (a new file is stored version 0, so it needs
1). The tombstone ``["0"]`` deletes a file by storing it like any hash list:
the name keeps its version, so a later re-create is version + 1, and clients
comparing versions see the deletion as one more change.

Dedup (exactly-once writes for retried requests): every update carries
``(client_id, seq)``, and each shard keeps a ``surfshard.replica.dedup``
table of its clients' recent answers, with a window of ``DEDUP_WINDOW``
sequences per client (a client may have that many writes in flight to one
shard, committing in any order) and at most ``MAX_SESSIONS_PER_SHARD``
named clients, plus as many one-shot identities (callers without one of
their own get one per call). The table travels with its shard
(``export_shard``). A client
evicted while a retry is still pending loses exactly-once for that retry:
the retry is applied as new and, the file having moved on, answers with a
version mismatch. The CAS rule keeps the file itself correct.
"""

from __future__ import annotations

import bisect
import io
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import cbor2
from twisted.logger import Logger
from zope.interface import implementer

from raft.interfaces import ISnapshotCopy, IStateMachine
from surfshard.errors import BadRequest, ErrorCode, NotReady, WrongGroup
from surfshard.keyspace import (
    HASH_JOINER,
    MAX_FILENAME_BYTES,
    MAX_SHARDS,
    MAX_VERSION,
    TOMBSTONE,
    joined_hashes,
    shard_of,
    validate_filename,
    validate_hashlist,
    validate_version,
)
from surfshard.metadata.handoff import (
    CHUNK_BYTES,
    MAX_CHUNK_BYTES,
    MIN_CHUNK_BYTES,
    Cursor,
    Incoming,
    build_chunk,
    check_addresses,
    check_entry,
    check_gid,
    check_num,
    cursor_from_wire,
    cursor_to_wire,
)
from surfshard.replica.dedup import MAX_CLIENT_ID_BYTES, DedupTable, validate_client

#: Version of the snapshot and shard-export encodings. Format 2 added the
#: shards in transit (``incoming``, ``outgoing``, ``acks``) and each shard's
#: ``revision``; format 1 is still read (it has neither).
FORMAT = 2
_READABLE_FORMATS = (1, 2)

#: What a shard's change feed remembers (``MetadataStateMachine.changes``):
#: its last HISTORY_ENTRIES writes, with names of at most HISTORY_BYTES in
#: all; older ones are compacted away, and a reader asking from before them
#: is told so and lists the shard instead (etcd's ErrCompacted). Constants,
#: not settings: replicas with different bounds would diverge.
HISTORY_ENTRIES = 10_000
HISTORY_BYTES = 512 * 1024
#: What one change costs against HISTORY_BYTES beyond its name.
_HISTORY_ENTRY_BYTES = 16
#: Most changes one ``changes`` page holds.
MAX_CHANGES_PAGE = 10_000

#: Answers kept per client per shard: how many writes one client may have in
#: flight to one shard and still get exactly-once.
DEDUP_WINDOW = 32

#: Clients remembered per shard before the least recently used is forgotten.
#: A constant, not a config setting: it is part of what ``apply`` does, and
#: replicas (or a replay of the log) with different bounds would diverge.
MAX_SESSIONS_PER_SHARD = 4096
#: One-shot sessions (callers without an identity, one per call) remembered
#: per shard, in a pool of their own so they never evict a named client.
MAX_ONE_SHOT_PER_SHARD = 4096


#: Encoded updates a replica remembers decoded (see
#: ``MetadataStateMachine.encode_update``), and the largest one it remembers:
#: proposals that never commit leave theirs behind until the next clear, so
#: this bounds that memory (~64 MiB); a bigger command is decoded, which
#: costs little next to everything else done with it.
_MAX_REMEMBERED = 4096
_MAX_REMEMBERED_BYTES = 16 * 1024
#: Batches remembered the same way (each at most MAX_BATCH_BYTES: ~64 MiB).
_MAX_REMEMBERED_BATCHES = 256

OP_UPDATE = "update"
_UPDATE_KEYS = frozenset({"op", "name", "version", "hashlist", "client", "seq"})
#: Move this group to shard map ``num`` (exactly one more than its own):
#: serve ``adopt`` (shards no group ever held: they start empty), pull each
#: ``incoming`` shard ``[shard, from_gid, [addresses]]`` from the group that
#: held it under ``num - 1``, freeze each ``outgoing`` shard for its new
#: owner. Refused while any shard is still moving (see
#: ``surfshard.metadata.handoff``).
OP_CONFIG = "config"
_CONFIG_KEYS = frozenset({"op", "num", "adopt"})
_CONFIG_KEYS_MOVING = frozenset({"op", "num", "adopt", "incoming", "outgoing"})
#: One chunk of an incoming shard (``handoff``): ``{"op": "install", "num",
#: "shard", "from": cursor, "next": cursor, "files": [entry, ...], "done",
#: "sessions", "revision"}``; the last (``done``) makes the shard serve.
OP_INSTALL = "install"
_INSTALL_KEYS = frozenset({"op", "num", "shard", "from", "next", "files", "done", "sessions", "revision"})
#: ... and the shard's change feed on the last chunk (``history``, ``compacted``).
_INSTALL_KEYS_FEED = _INSTALL_KEYS | {"history", "compacted"}
#: The target has installed ``shard`` (the source checked): drop the frozen copy.
OP_DELETE = "delete"
_SHARD_OP_KEYS = frozenset({"op", "num", "shard"})
#: Several updates in one Raft entry, applied in order, each exactly as if
#: it were an entry of its own (its own version check, dedup and answer):
#: ``{"op": "batch", "cmds": [update, ...]}``. The leader packs the updates
#: that reach it in one reactor turn this way, so Raft's per-entry work
#: (proposal, log record, replication, waiter) is paid once per batch.
OP_BATCH = "batch"
_BATCH_KEYS = frozenset({"op", "cmds"})
#: A batch holds at most this many updates, and is closed before its bytes
#: pass MAX_BATCH_BYTES (it stays a modest Raft entry; one bigger update
#: travels alone).
MAX_BATCH_COMMANDS = 256
MAX_BATCH_BYTES = 256 * 1024
_BATCH_PREFIX = b"\xa2\x62op\x65batch\x64cmds"  # canonical: "op" sorts before "cmds"


def encode_config(
    num: int,
    adopt: Iterable[int],
    incoming: Iterable[tuple[int, int, Iterable[str]]] = (),
    outgoing: Iterable[tuple[int, int, Iterable[str]]] = (),
) -> bytes:
    """The command moving a group to shard map ``num``: adopting empty
    shards, pulling ``incoming`` ``(shard, from_gid, addresses)``, freezing
    ``outgoing`` ``(shard, to_gid, addresses)``."""
    check_num(num, "shard map number")
    command: dict[str, Any] = {"op": OP_CONFIG, "num": num, "adopt": sorted(set(adopt))}
    incoming = sorted((s, g, list(a)) for s, g, a in incoming)
    outgoing = sorted((s, g, list(a)) for s, g, a in outgoing)
    if incoming or outgoing:
        command["incoming"] = [list(i) for i in incoming]
        command["outgoing"] = [list(o) for o in outgoing]
    return cbor2.dumps(command, canonical=True)


def encode_install(
    num: int,
    shard: int,
    start: Cursor,
    end: Cursor,
    files: list[list[Any]],
    sessions: list[Any] | None = None,
    revision: int | None = None,
    history: list[Any] | None = None,
    compacted: int | None = None,
) -> bytes:
    """One chunk of an incoming shard; the last one (``end`` None) carries
    the shard's dedup ``sessions``, ``revision`` and change feed
    (``history``, ``compacted``)."""
    done = end is None
    command = {
        "op": OP_INSTALL,
        "num": num,
        "shard": shard,
        "from": cursor_to_wire(start),
        "next": cursor_to_wire(end),
        "files": files,
        "done": done,
        "sessions": sessions if done else None,
        "revision": revision if done else None,
    }
    if done and history is not None:
        command["history"], command["compacted"] = history, compacted
    return cbor2.dumps(command, canonical=True)


def encode_delete(num: int, shard: int) -> bytes:
    return cbor2.dumps({"op": OP_DELETE, "num": num, "shard": shard}, canonical=True)


FileInfo = tuple[int, tuple[str, ...]]

_TOMBSTONE_LIST: tuple[str, ...] = (TOMBSTONE,)


def _common_update(name: Any, version: Any, client_id: Any, seq: Any) -> bool:
    """Whether the validators of the name, version, client id and seq would
    all accept these, for their common case (ASCII strings: their UTF-8
    size is their length) in one expression; False sends a caller through
    the validators themselves."""
    return (
        type(name) is str
        and type(client_id) is str
        and type(version) is int
        and type(seq) is int
        and name.isascii()
        and client_id.isascii()
        and 0 < len(name) <= MAX_FILENAME_BYTES
        and 0 < len(client_id) <= MAX_CLIENT_ID_BYTES
        and 1 <= version <= MAX_VERSION
        and 1 <= seq <= MAX_VERSION
        and "\x00" not in name
        and name[0] != "/"
        and name[-1] != "/"
    )


def encode_update(
    name: str, version: int, hashlist: list[str] | tuple[str, ...], client_id: str, seq: int
) -> bytes:
    """The command for ``updatefile(name, version, hashlist)`` sent by
    ``(client_id, seq)``. Validates first (``BadRequest``), so nothing
    malformed is ever proposed from here."""
    if _common_update(name, version, client_id, seq):
        name_bytes = name.encode("ascii")
        client_bytes = client_id.encode("ascii")
    else:
        validate_client(client_id, seq)
        validate_filename(name)
        validate_version(version)
        name_bytes = name.encode("utf-8")
        client_bytes = client_id.encode("utf-8")
    hashes = _hashlist_cbor(hashlist)
    name_len, client_len = len(name_bytes), len(client_bytes)
    return b"".join(
        (
            _UPDATE_PREFIX,
            _UINT_HEADS[seq] if seq < 0x100 else _cbor_head(0, seq),
            b"\x64name",
            _TEXT_HEADS[name_len] if name_len < 0x100 else _cbor_head(0x60, name_len),
            name_bytes,
            b"\x66client",
            _TEXT_HEADS[client_len] if client_len < 0x100 else _cbor_head(0x60, client_len),
            client_bytes,
            b"\x67version",
            _UINT_HEADS[version] if version < 0x100 else _cbor_head(0, version),
            b"\x68hashlist",
            hashes,
        )
    )


# The update command is canonical CBOR (RFC 7049 3.9: map keys shortest
# first, then bytewise): op, seq, name, client, version, hashlist. It lives in
# Raft logs on disk, so these bytes are a file format (pinned by a test).
# Writing them directly costs a quarter of cbor2.dumps(canonical=True): every
# write on the leader does it.
_UPDATE_PREFIX = b"\xa6\x62op\x66update\x63seq"
_TOMBSTONE_CBOR = b"\x81\x61\x30"  # ["0"]
_EMPTY_LIST_CBOR = b"\x80"  # []
_HASH_JOINER_BYTES = HASH_JOINER.encode("ascii")


def _cbor_head(major: int, n: int) -> bytes:
    """The shortest head of a CBOR item of ``major`` type (shifted) and argument ``n``."""
    if n < 24:
        return bytes((major | n,))
    if n < 0x100:
        return bytes((major | 24, n))
    if n < 0x10000:
        return bytes((major | 25,)) + n.to_bytes(2, "big")
    if n < 0x100000000:
        return bytes((major | 26,)) + n.to_bytes(4, "big")
    return bytes((major | 27,)) + n.to_bytes(8, "big")


#: Heads of unsigned integers and of text strings below 256, looked up.
_UINT_HEADS = tuple(_cbor_head(0x00, n) for n in range(0x100))
_TEXT_HEADS = tuple(_cbor_head(0x60, n) for n in range(0x100))


def _hashlist_cbor(hashlist: Any) -> bytes:
    """A hash list as a CBOR array; ``BadRequest`` if it is not a valid one."""
    joined = joined_hashes(hashlist)
    if joined is None:  # not the common case: refuse it, or a plain list of it
        hashlist = validate_hashlist(hashlist)
        if not hashlist:
            return _EMPTY_LIST_CBOR
        if hashlist == [TOMBSTONE]:
            return _TOMBSTONE_CBOR
        joined = joined_hashes(hashlist)
        assert joined is not None, "validate_hashlist accepted what joined_hashes refuses"
    # Every hash is 64 ASCII characters: each is the joiner (its CBOR head)
    # followed by its bytes.
    count = len(hashlist)
    head = bytes((0x80 | count,)) if count < 24 else _cbor_head(0x80, count)
    return head + _HASH_JOINER_BYTES + joined.encode("ascii")


def encode_batch(commands: list[bytes]) -> bytes:
    """The batch command of ``commands``, each an ``encode_update`` result
    (a canonical CBOR map, so the batch is canonical CBOR too: the array
    holds the maps themselves, nothing is encoded twice)."""
    if not 1 <= len(commands) <= MAX_BATCH_COMMANDS:
        raise ValueError(f"a batch holds 1..{MAX_BATCH_COMMANDS} updates, not {len(commands)}")
    return b"".join((_BATCH_PREFIX, _cbor_head(0x80, len(commands)), *commands))


# -- results ------------------------------------------------------------------


def _ok(version: int) -> dict[str, Any]:
    return {"ok": True, "version": version}


def _mismatch(current: int) -> dict[str, Any]:
    return {
        "ok": False,
        "code": ErrorCode.VERSION_MISMATCH.value,
        "message": f"version mismatch: stored version is {current}",
        "current": current,
    }


def _error(code: ErrorCode, message: str, **details: Any) -> dict[str, Any]:
    return {"ok": False, "code": code.value, "message": message, **details}


# An answer as stored in a session: (ok, version if ok else current version).
# Stored compactly since there may be DEDUP_WINDOW of them per client.
_Answer = tuple[bool, int]


def _answer_result(answer: _Answer) -> dict[str, Any]:
    ok, number = answer
    return _ok(number) if ok else _mismatch(number)


def _new_dedup() -> DedupTable[_Answer]:
    # Module globals read at creation, so a test may patch the window.
    return DedupTable(DEDUP_WINDOW, MAX_SESSIONS_PER_SHARD, MAX_ONE_SHOT_PER_SHARD)


@dataclass
class _ShardState:
    files: dict[str, FileInfo] = field(default_factory=dict)
    dedup: DedupTable[_Answer] = field(default_factory=_new_dedup)
    #: Successful writes this shard has taken, wherever it was: it travels
    #: with the shard and never goes back. Invariant: never decreases.
    revision: int = 0
    #: Each file's revision of its last change (etcd's mod_revision; 0 if
    #: it came from a shard that did not record one). Invariant: keys are
    #: a subset of ``files``, values at most ``revision``.
    mod: dict[str, int] = field(default_factory=dict)
    #: The change feed: ``(revision, name, version)`` of each write in
    #: revision order. Invariant: it holds exactly the revisions
    #: ``compacted + 1 .. revision``, one write each.
    history: deque[tuple[int, str, int]] = field(default_factory=deque)
    compacted: int = 0
    #: Bytes of ``history`` counted against HISTORY_BYTES (derived).
    history_bytes: int = 0
    #: The file names in order as of ``_names_at`` (a revision): derived,
    #: not state, rebuilt for a listing when the shard changed since.
    _names: list[str] = field(default_factory=list, compare=False, repr=False)
    _names_at: int = field(default=-1, compare=False, repr=False)

    def record(self, name: str, version: int) -> None:
        """A write of ``name`` at ``version`` succeeded: the next revision."""
        revision = self.revision = self.revision + 1
        self.mod[name] = revision
        self.history.append((revision, name, version))
        self.history_bytes += len(name) + _HISTORY_ENTRY_BYTES
        history = self.history
        while len(history) > HISTORY_ENTRIES or self.history_bytes > HISTORY_BYTES:
            old, old_name, _ = history.popleft()
            self.history_bytes -= len(old_name) + _HISTORY_ENTRY_BYTES
            self.compacted = old

    def changes(self, since: int, limit: int, max_hashes: int) -> dict[str, Any]:
        """The writes after revision ``since`` in revision order (see
        ``MetadataStateMachine.changes``)."""
        if since < self.compacted:
            return {"compacted": True, "revision": self.revision, "oldest": self.compacted}
        if since > self.revision:
            raise BadRequest(
                f"revision {since} is ahead of this shard's revision {self.revision}: "
                "a cursor of another cluster, or of a shard that lost its state"
            )
        out: list[list[Any]] = []
        hashes = 0
        files = self.files
        for revision, name, version in itertools.islice(self.history, since - self.compacted, None):
            if len(out) >= limit:
                break
            current_version, hashlist = files[name]
            # A later write replaced this one: the feed says it happened,
            # its blocks are the later one's business.
            listed = list(hashlist) if current_version == version else None
            if out and listed is not None and hashes + len(listed) > max_hashes:
                break
            out.append([revision, name, version, listed])
            hashes += len(listed) if listed is not None else 0
        last = out[-1][0] if out else since
        return {
            "compacted": False,
            "revision": self.revision,
            "changes": out,
            "next": last,
            "more": last < self.revision,
        }

    def feed_to_wire(self, order: Iterable[str] | None = None) -> dict[str, Any]:
        """The feed as plain data. With ``order`` (the files' names in the
        order their map is encoded), names are not written again: ``mod`` is
        a list of revisions in that order and each history entry names its
        file by position; without, by name (a shard handed to another group)."""
        return _feed_to_wire(self.mod, list(self.history), self.compacted, order)

    def restore_feed(self, wire: dict[str, Any], shard: int) -> None:
        """Load ``feed_to_wire`` output (checked: it may come from another
        group); without one (an older encoding) the feed starts at the
        shard's revision. Positions (a ``mod`` list, a history entry naming
        its file by number) refer to ``files`` in the order it was decoded."""
        if "history" not in wire:
            self.compacted = self.revision
            return
        mod: Any = wire.get("mod")
        history, compacted = wire["history"], wire.get("compacted")
        if type(mod) not in (dict, list) or type(history) is not list or len(history) > HISTORY_ENTRIES:
            raise BadRequest(f"shard {shard}: feed must be mod revisions and a history list")
        compacted = _check_revision(compacted)
        if compacted + len(history) != self.revision:
            raise BadRequest(f"shard {shard}: history does not end at the shard's revision {self.revision}")
        order: list[str] = list(self.files) if type(mod) is list else []
        if type(mod) is list:
            if len(mod) != len(order):
                raise BadRequest(f"shard {shard}: {len(mod)} mod revisions for {len(order)} files")
            mod = {name: revision for name, revision in zip(order, mod, strict=True) if revision != 0}
        for name, revision in mod.items():
            if name not in self.files or type(revision) is not int or not 0 <= revision <= self.revision:
                raise BadRequest(f"shard {shard}: bad mod revision for {name!r}"[:200])
        self.mod = dict(mod)
        for k, entry in enumerate(history):
            if not (type(entry) is list and len(entry) == 3 and entry[0] == compacted + 1 + k):
                raise BadRequest(
                    f"shard {shard}: history entry {k} is not [revision, name, version] in order"
                )
            _, name, version = entry
            if type(name) is int:
                if not order:
                    order = list(self.files)
                if not 0 <= name < len(order):
                    raise BadRequest(f"shard {shard}: history entry {k} names file {name} of {len(order)}")
                name = order[name]
            if name not in self.files:
                raise BadRequest(f"shard {shard}: history names unknown file {name!r}"[:200])
            validate_version(version)
            self.history.append((entry[0], name, version))
            self.history_bytes += len(name) + _HISTORY_ENTRY_BYTES
        self.compacted = compacted

    def sorted_names(self) -> list[str]:
        if self._names_at != self.revision or len(self._names) != len(self.files):
            self._names = sorted(self.files)
            self._names_at = self.revision
        return self._names

    def sessions_to_wire(self) -> list[Any]:
        return [
            [client, s.floor, [[seq, ok, n] for seq, (ok, n) in sorted(s.answers.items())]]
            for client, s in self.dedup.items()
        ]

    def to_wire(self) -> dict[str, Any]:
        return {
            "files": {name: [v, list(h)] for name, (v, h) in self.files.items()},
            "sessions": self.sessions_to_wire(),
            "revision": self.revision,
            **self.feed_to_wire(self.files),
        }

    @classmethod
    def from_wire(cls, wire: Any, shard: int, nshards: int) -> _ShardState:
        """Rebuild a shard from ``to_wire`` output, checking everything: the
        data may come from another group over the network."""
        if not isinstance(wire, dict) or set(wire) not in (
            {"files", "sessions"},
            {"files", "sessions", "revision"},
            {"files", "sessions", "revision", "mod", "history", "compacted"},
        ):
            raise BadRequest(f"shard {shard}: expected a map with files, sessions and revision")
        files_w = wire["files"]
        if not isinstance(files_w, dict):
            raise BadRequest(f"shard {shard}: files must be a map")
        state = cls()
        state.revision = _check_revision(wire.get("revision", 0))
        for name, info in files_w.items():
            validate_filename(name)
            if shard_of(name, nshards) != shard:
                raise BadRequest(f"shard {shard}: file {name!r} belongs to shard {shard_of(name, nshards)}")
            if not isinstance(info, list) or len(info) != 2:
                raise BadRequest(f"shard {shard}: file {name!r} must be [version, hashlist]")
            version = validate_version(info[0])
            hashes = validate_hashlist(info[1])
            state.files[name] = (version, _TOMBSTONE_LIST if hashes == [TOMBSTONE] else tuple(hashes))
        state.restore_sessions(wire["sessions"], shard)
        state.restore_feed(wire, shard)
        return state

    def restore_sessions(self, sessions_w: Any, shard: int) -> None:
        """Load dedup sessions from ``sessions_to_wire`` output (checked:
        they may come from another group)."""
        if not isinstance(sessions_w, list):
            raise BadRequest(f"shard {shard}: sessions must be a list")
        if len(sessions_w) > MAX_SESSIONS_PER_SHARD + MAX_ONE_SHOT_PER_SHARD:
            raise BadRequest(
                f"shard {shard}: more than {MAX_SESSIONS_PER_SHARD + MAX_ONE_SHOT_PER_SHARD} sessions"
            )
        for entry in sessions_w:
            if not isinstance(entry, list) or len(entry) != 3 or not isinstance(entry[2], list):
                raise BadRequest(f"shard {shard}: session must be [client, floor, answers]")
            client, floor, answers_w = entry
            validate_client(client, 1)
            if client in self.dedup:
                raise BadRequest(f"shard {shard}: client {client!r} has two sessions")
            if not isinstance(floor, int) or isinstance(floor, bool) or not 0 <= floor <= MAX_VERSION:
                raise BadRequest(f"shard {shard}: bad session floor {floor!r}")
            if len(answers_w) > DEDUP_WINDOW:
                raise BadRequest(
                    f"shard {shard}: session of {client!r} holds more than {DEDUP_WINDOW} answers"
                )
            answers: dict[int, _Answer] = {}
            for a in answers_w:
                if not (isinstance(a, list) and len(a) == 3 and isinstance(a[1], bool)):
                    raise BadRequest(f"shard {shard}: answer must be [seq, ok, number]")
                seq, ok, number = a
                validate_client(client, seq)
                if seq <= floor or seq in answers:
                    raise BadRequest(f"shard {shard}: answer seq {seq} of {client!r} is stale or repeated")
                if not isinstance(number, int) or isinstance(number, bool) or not 0 <= number <= MAX_VERSION:
                    raise BadRequest(f"shard {shard}: bad answer number {number!r}")
                answers[seq] = (ok, number)
            self.dedup.restore(client, floor, answers)


@dataclass(frozen=True, slots=True)
class _ShardCopy:
    """A shard as of one moment, for a snapshot encoded later."""

    files: dict[str, FileInfo]
    sessions: list[Any]
    revision: int
    feed: dict[str, Any]

    @classmethod
    def of(cls, state: _ShardState) -> _ShardCopy:
        feed = {"mod": dict(state.mod), "history": list(state.history), "compacted": state.compacted}
        return cls(dict(state.files), state.sessions_to_wire(), state.revision, feed)

    def to_wire(self) -> dict[str, Any]:
        """``_ShardState.to_wire`` of the copy, its file map pre-encoded."""
        files, order = _encode_files(self.files)
        return {
            "files": files,
            "sessions": self.sessions,
            "revision": self.revision,
            **_feed_to_wire(self.feed["mod"], self.feed["history"], self.feed["compacted"], order),
        }


class _RawCBOR:
    """One CBOR item already encoded, in pieces, written as they are
    (``_write_raw``)."""

    __slots__ = ("parts",)

    def __init__(self, parts: list[bytes]) -> None:
        self.parts = parts


def _write_raw(encoder: Any, value: Any) -> None:
    if not isinstance(value, _RawCBOR):
        raise TypeError(f"cannot encode {type(value).__name__} in a snapshot")
    for part in value.parts:
        encoder.write(part)


#: Files encoded per cbor2 call in a snapshot: a call holds the GIL while
#: it runs, so an encoding in a thread yields to the event loop between
#: slices (a slice of small files encodes in about a millisecond).
_SNAPSHOT_SLICE = 2048


def _feed_to_wire(
    mod: dict[str, int], history: list[tuple[int, str, int]], compacted: int, order: Iterable[str] | None
) -> dict[str, Any]:
    """See ``_ShardState.feed_to_wire``."""
    if order is None:
        return {"mod": dict(mod), "history": [list(h) for h in history], "compacted": compacted}
    named = {name for _, name, _ in history}
    mods: list[int] = []
    position: dict[str, int] = {}
    for i, name in enumerate(order):
        mods.append(mod.get(name, 0))
        if name in named:
            position[name] = i
    return {"mod": mods, "history": [[r, position[n], v] for r, n, v in history], "compacted": compacted}


def _encode_files(files: dict[str, FileInfo]) -> tuple[_RawCBOR, list[str]]:
    """``{name: [version, hashes]}`` as canonical CBOR (keys ordered by
    their encoding: length first, then bytes), a slice at a time. A map's
    body is the concatenation of its keys and values, which is the body of
    the array of them in that order: each slice is encoded as an array and
    its head dropped."""
    keyed = sorted((len(b), b, name) for name in files for b in (name.encode("utf-8"),))
    order = [name for _, _, name in keyed]
    parts = [_cbor_head(0xA0, len(keyed))]  # a map
    for i in range(0, len(keyed), _SNAPSHOT_SLICE):
        flat: list[Any] = []
        for _, _, name in keyed[i : i + _SNAPSHOT_SLICE]:
            flat.append(name)
            flat.append(files[name])  # (version, tuple of hashes): an array, as [v, list(h)]
        parts.append(cbor2.dumps(flat)[len(_cbor_head(0x80, len(flat))) :])  # minus the array's head
        # Hand the GIL over now: an event loop waiting for it runs at once
        # instead of at the interpreter's next switch.
        time.sleep(0)
    return _RawCBOR(parts), order


def _check_revision(revision: Any) -> int:
    if type(revision) is not int or not 0 <= revision <= MAX_VERSION:
        raise BadRequest(f"revision must be an integer >= 0, not {revision!r}"[:200])
    return revision


@dataclass
class _Outgoing:
    """A shard this group held under map ``num - 1`` and gives to group
    ``target`` under ``num``: frozen (nothing may change it) until the
    target has installed it and asks for the delete."""

    num: int
    target: int
    #: Where the target group's replicas are (from map ``num``).
    addresses: tuple[str, ...]
    state: _ShardState
    #: The file names in order, for chunking (not state: derived, cached).
    names: list[str] | None = None

    def sorted_names(self) -> list[str]:
        if self.names is None:
            self.names = sorted(self.state.files)
        return self.names


def _decoded_update(wire: dict[str, Any]) -> tuple[str, int, tuple[str, ...], str, int]:
    """(name, version, hashes, client, seq) of a decoded update command;
    ``BadRequest`` if it is malformed."""
    if wire.keys() != _UPDATE_KEYS:
        raise BadRequest(f"update command must have exactly the keys {sorted(_UPDATE_KEYS)}")
    name, version, client, seq = wire["name"], wire["version"], wire["client"], wire["seq"]
    hashlist = wire["hashlist"]
    if _common_update(name, version, client, seq) and joined_hashes(hashlist) is not None:
        return name, version, tuple(hashlist), client, seq
    name = validate_filename(name)
    version = validate_version(version)
    hashlist = validate_hashlist(hashlist)
    client, seq = validate_client(client, seq)
    return name, version, _TOMBSTONE_LIST if hashlist == [TOMBSTONE] else tuple(hashlist), client, seq


def _decode(data: Any, what: str) -> Any:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise BadRequest(f"{what} must be bytes, not {type(data).__name__}")
    try:
        return cbor2.loads(bytes(data))
    except Exception as e:  # cbor2 raises several types on garbage (and RecursionError on nesting)
        raise BadRequest(f"{what} is not valid CBOR: {type(e).__name__}: {e}") from None


@implementer(IStateMachine, ISnapshotCopy)
class MetadataStateMachine:
    """SurfStore's file map for the shards this group owns, plus dedup.

    ``nshards`` is the cluster's fixed shard count; ``owned`` the shards this
    group starts with (default: all of them, for a static single-group
    cluster). Shard ownership then changes only through committed commands
    (``config``, ``install``, ``delete``: see ``surfshard.metadata.handoff``).
    ``import_shard`` and ``release_shard`` change it directly, for tests and
    tools that must run them at the same log position on every replica.

    Reads (``getfileinfo``, ``getfileinfomap``, ``version_of``) return
    applied state as is: the server calls them only after a ReadIndex round
    confirmed leadership, which is what makes them linearizable.
    """

    log = Logger()

    def __init__(self, nshards: int = 1, owned: Iterable[int] | None = None) -> None:
        if not isinstance(nshards, int) or isinstance(nshards, bool) or not 1 <= nshards <= MAX_SHARDS:
            raise ValueError(f"nshards must be an integer 1..{MAX_SHARDS}, not {nshards!r}")
        self.nshards = nshards
        shards = range(nshards) if owned is None else owned
        self._shards: dict[int, _ShardState] = {}
        #: The shard map number this group has moved to (0: none yet).
        self.config_num = 0
        # Shards in transit (``handoff``). Invariant: the keys of
        # ``_shards`` (serving), ``_incoming`` and ``_outgoing`` are
        # disjoint, and the last two are empty whenever a new map is taken.
        self._incoming: dict[int, Incoming] = {}
        self._outgoing: dict[int, _Outgoing] = {}
        #: Called (no arguments) when a map that moves shards is applied or
        #: a snapshot with shards in transit is restored: the migrator's cue.
        self.on_moving: list[Callable[[], object]] = []
        # Updates this replica encoded (as leader) and has not applied yet,
        # decoded: command bytes -> (name, version, hashes, client, seq).
        # Applying one of these skips decoding and validating it again. Not
        # state: the entry is a function of the bytes, so a replica that
        # has it applies a command exactly as one that decodes it.
        self._encoded: dict[bytes, tuple[str, int, tuple[str, ...], str, int]] = {}
        # The same for batches: batch bytes -> its updates, decoded.
        self._encoded_batches: dict[bytes, list[tuple[str, int, tuple[str, ...], str, int]]] = {}
        for s in sorted(set(shards)):
            self._check_shard(s)
            self._shards[s] = _ShardState()

    # -- ownership ---------------------------------------------------------

    @property
    def owned_shards(self) -> frozenset[int]:
        return frozenset(self._shards)

    def owns(self, shard: int) -> bool:
        return shard in self._shards

    def _check_shard(self, shard: Any) -> int:
        if not isinstance(shard, int) or isinstance(shard, bool) or not 0 <= shard < self.nshards:
            raise ValueError(f"shard must be an integer in [0, {self.nshards}), not {shard!r}")
        return shard

    def _owned_state(self, name: str) -> _ShardState:
        shard = shard_of(name, self.nshards)
        state = self._shards.get(shard)
        if state is None:
            raise WrongGroup(self._wrong_group(shard)["message"], shard=shard, num=self.config_num)
        return state

    def export_shard(self, shard: int) -> bytes:
        """One owned shard's files and dedup sessions, for another group's
        ``import_shard``. The shard stays owned here until ``release_shard``."""
        self._check_shard(shard)
        state = self._shards.get(shard)
        if state is None:
            raise WrongGroup(f"this group does not hold shard {shard}", shard=shard)
        wire = {"format": FORMAT, "nshards": self.nshards, "shard": shard, **state.to_wire()}
        return cbor2.dumps(wire, canonical=True)

    def import_shard(self, shard: int, data: bytes) -> None:
        """Take ownership of ``shard`` with the content ``export_shard`` gave,
        replacing anything held for it. ``BadRequest`` (and no change) if the
        data is malformed or is for another shard or shard count."""
        self._check_shard(shard)
        wire = _decode(data, "shard export")
        if not isinstance(wire, dict) or not {"format", "nshards", "shard"} <= wire.keys():
            raise BadRequest("shard export must be a map with format, nshards and shard")
        if wire["format"] != FORMAT:
            raise BadRequest(f"shard export has format {wire['format']!r}, this node reads {FORMAT}")
        if wire["nshards"] != self.nshards or wire["shard"] != shard:
            raise BadRequest(
                f"shard export is shard {wire['shard']!r} of {wire['nshards']!r}, not shard {shard} of {self.nshards}"
            )
        body = {k: v for k, v in wire.items() if k not in ("format", "nshards", "shard")}
        self._shards[shard] = _ShardState.from_wire(body, shard, self.nshards)
        self._shards = dict(sorted(self._shards.items()))

    def release_shard(self, shard: int) -> None:
        """Drop a shard (after it was handed to its new group)."""
        self._check_shard(shard)
        self._shards.pop(shard, None)

    # -- commands ----------------------------------------------------------

    def encode_update(
        self, name: str, version: int, hashlist: list[str] | tuple[str, ...], client_id: str, seq: int
    ) -> bytes:
        """``encode_update`` for a command this replica is about to propose:
        also remembers it decoded, so applying it here (once committed) skips
        decoding and validating what was just encoded. The bytes are the
        same as the module function's."""
        command = encode_update(name, version, hashlist, client_id, seq)
        if len(command) > _MAX_REMEMBERED_BYTES:
            return command
        encoded = self._encoded
        if len(encoded) >= _MAX_REMEMBERED:
            # Proposals that never commit (lost leadership) leave theirs
            # behind; forgetting costs only a decode.
            encoded.clear()
        hashes = _TOMBSTONE_LIST if len(hashlist) == 1 and hashlist[0] == TOMBSTONE else tuple(hashlist)
        encoded[command] = (name, version, hashes, client_id, seq)
        return command

    def encode_batch(self, commands: list[bytes]) -> bytes:
        """``encode_batch`` for a batch this replica is about to propose,
        remembered like ``encode_update``'s commands (which it takes over)."""
        batch = encode_batch(commands)
        encoded = self._encoded
        known = [encoded.pop(c, None) for c in commands]
        if all(k is not None for k in known):
            batches = self._encoded_batches
            if len(batches) >= _MAX_REMEMBERED_BATCHES:
                batches.clear()  # as for updates: forgetting costs only a decode
            batches[batch] = known  # type: ignore[assignment]
        return batch

    # -- IStateMachine -------------------------------------------------------

    def apply(self, command: bytes) -> dict[str, Any]:
        """Apply one committed command and return its result map; never raises."""
        try:
            return self._apply(command)
        except BadRequest as e:
            self.log.warn("refused a malformed command: {error}", error=e.message)
            return _error(ErrorCode.BAD_REQUEST, e.message)
        except Exception as e:
            # A bug, not bad input. Every replica hits it identically, so the
            # replicas stay in step; the proposer gets an INTERNAL error.
            self.log.failure("metadata state machine failed applying a command")
            return _error(ErrorCode.INTERNAL, f"{type(e).__name__} applying a command")

    def _apply(self, command: bytes) -> dict[str, Any]:
        if self._encoded_batches and type(command) is bytes:
            batch = self._encoded_batches.pop(command, None)
            if batch is not None:
                update = self._apply_update
                return {"ok": True, "results": [update(*known) for known in batch]}
        known = self._encoded.pop(command, None) if type(command) is bytes and self._encoded else None
        if known is not None:
            return self._apply_update(*known)
        wire = _decode(command, "command")
        if type(wire) is not dict:
            raise BadRequest(f"command must be a map, not {type(wire).__name__}")
        op = wire.get("op")
        if op == OP_UPDATE:
            return self._apply_update(*_decoded_update(wire))
        if op == OP_BATCH:
            return self._apply_batch(wire)
        if op == OP_CONFIG:
            return self._apply_config(wire)
        if op == OP_INSTALL:
            return self._apply_install(wire)
        if op == OP_DELETE:
            return self._apply_delete(wire)
        raise BadRequest(f"unknown command op {op!r}")

    def _apply_batch(self, wire: dict[str, Any]) -> dict[str, Any]:
        if wire.keys() != _BATCH_KEYS:
            raise BadRequest(f"batch command must have exactly the keys {sorted(_BATCH_KEYS)}")
        commands = wire["cmds"]
        if type(commands) is not list or not 1 <= len(commands) <= MAX_BATCH_COMMANDS:
            raise BadRequest(f"batch cmds must be a list of 1..{MAX_BATCH_COMMANDS} updates")
        # Each update stands alone: a malformed one is refused by itself
        # (every replica refuses it alike), the others apply.
        results = []
        for i, update in enumerate(commands):
            try:
                if type(update) is not dict or update.get("op") != OP_UPDATE:
                    raise BadRequest(f"batch cmds[{i}] is not an update command")
                results.append(self._apply_update(*_decoded_update(update)))
            except BadRequest as e:
                self.log.warn("refused a malformed update in a batch: {error}", error=e.message)
                results.append(_error(ErrorCode.BAD_REQUEST, e.message))
        return {"ok": True, "results": results}

    def _apply_update(
        self, name: str, version: int, hashes: tuple[str, ...], client: str, seq: int
    ) -> dict[str, Any]:
        # One shard (a static cluster) needs no hashing: h * 1 >> 64 is 0.
        shard = 0 if self.nshards == 1 else shard_of(name, self.nshards)
        state = self._shards.get(shard)
        if state is None:
            return self._wrong_group(shard)

        dedup = state.dedup
        session = dedup.touch(client)
        known = session.answers.get(seq)
        if known is not None:
            return _answer_result(known)
        if session.is_stale(seq, dedup.window):
            return _error(
                ErrorCode.BAD_REQUEST,
                f"stale sequence {seq} for client {client!r}: older than the writes this shard"
                f" remembers for it (window {DEDUP_WINDOW}); not applied",
            )

        stored = state.files.get(name)
        current = stored[0] if stored is not None else 0
        if version != current + 1:
            dedup.record(session, seq, (False, current))
            return _mismatch(current)
        state.files[name] = (version, hashes)
        state.record(name, version)
        if state._names_at == state.revision - 1:
            # Keep a fresh listing order fresh: a new name goes in at
            # its place, instead of a sort of the whole shard later.
            if stored is None:
                bisect.insort(state._names, name)
            state._names_at = state.revision
        dedup.record(session, seq, (True, version))
        return {"ok": True, "version": version}  # _ok, inline: every write on every replica

    def _wrong_group(self, shard: int) -> dict[str, Any]:
        moving = "arriving" if shard in self._incoming else "leaving" if shard in self._outgoing else None
        why = (
            f"shard {shard} is {moving} (shard map {self.config_num})"
            if moving
            else (f"this group does not serve shard {shard} (shard map {self.config_num})")
        )
        return _error(ErrorCode.WRONG_GROUP, why, shard=shard, num=self.config_num)

    def _shard_arg(self, shard: Any) -> int:
        try:
            return self._check_shard(shard)
        except ValueError as e:
            raise BadRequest(str(e)) from None

    def _apply_config(self, wire: dict[str, Any]) -> dict[str, Any]:
        keys = set(wire)
        if keys != _CONFIG_KEYS and keys != _CONFIG_KEYS_MOVING:
            raise BadRequest(f"config command must have exactly the keys {sorted(_CONFIG_KEYS_MOVING)}")
        num = check_num(wire["num"], "config num")
        adopt, incoming_w, outgoing_w = wire["adopt"], wire.get("incoming", []), wire.get("outgoing", [])
        if type(adopt) is not list or type(incoming_w) is not list or type(outgoing_w) is not list:
            raise BadRequest("config adopt, incoming and outgoing must be lists")
        adopted = [self._shard_arg(s) for s in adopt]
        incoming: dict[int, Incoming] = {}
        for entry in incoming_w:
            if type(entry) is not list or len(entry) != 3:
                raise BadRequest("config incoming entries must be [shard, from_gid, addresses]")
            shard = self._shard_arg(entry[0])
            incoming[shard] = Incoming(num, check_gid(entry[1]), check_addresses(entry[2]))
        outgoing: dict[int, tuple[int, tuple[str, ...]]] = {}
        for entry in outgoing_w:
            if type(entry) is not list or len(entry) != 3:
                raise BadRequest("config outgoing entries must be [shard, to_gid, addresses]")
            outgoing[self._shard_arg(entry[0])] = (check_gid(entry[1]), check_addresses(entry[2]))
        gained = adopted + list(incoming)
        if len(set(gained) | set(outgoing)) != len(gained) + len(outgoing):
            raise BadRequest("config lists a shard twice")
        if num != self.config_num + 1:
            # A duplicate or out-of-order proposal (e.g. from a deposed
            # leader): maps are taken one at a time, in order.
            return _error(
                ErrorCode.BAD_REQUEST,
                f"group is at map {self.config_num}, not {num - 1}",
                num=self.config_num,
            )
        if self._incoming or self._outgoing:
            return _error(
                ErrorCode.NOT_READY,
                f"group is still moving shards of map {self.config_num}: "
                f"arriving {sorted(self._incoming)}, leaving {sorted(self._outgoing)}",
                num=self.config_num,
            )
        # Ownership is checked here, at apply time: a map that does not fit
        # what this group holds is refused whole, changing nothing.
        for shard in gained:
            if shard in self._shards:
                return _error(ErrorCode.BAD_REQUEST, f"config gains shard {shard}, which this group serves")
        for shard in outgoing:
            if shard not in self._shards:
                return _error(
                    ErrorCode.BAD_REQUEST, f"config gives away shard {shard}, which this group lacks"
                )
        for shard in adopted:
            self._shards[shard] = _ShardState()
        for shard, (target, addresses) in outgoing.items():
            self._outgoing[shard] = _Outgoing(num, target, addresses, self._shards.pop(shard))
        self._incoming.update(incoming)
        self._shards = dict(sorted(self._shards.items()))
        self.config_num = num
        if self.moving:
            self._tell_moving()
        return {"ok": True, "num": num}

    def _shard_command(self, wire: dict[str, Any], what: str) -> tuple[int, int]:
        if wire.keys() != _SHARD_OP_KEYS:
            raise BadRequest(f"{what} command must have exactly the keys {sorted(_SHARD_OP_KEYS)}")
        return check_num(wire["num"]), self._shard_arg(wire["shard"])

    def _apply_install(self, wire: dict[str, Any]) -> dict[str, Any]:
        if wire.keys() != _INSTALL_KEYS and wire.keys() != _INSTALL_KEYS_FEED:
            raise BadRequest(f"install command must have exactly the keys {sorted(_INSTALL_KEYS_FEED)}")
        num, shard = check_num(wire["num"]), self._shard_arg(wire["shard"])
        start = cursor_from_wire(wire["from"], "install from")
        end = cursor_from_wire(wire["next"], "install next")
        done, files = wire["done"], wire["files"]
        if type(done) is not bool or done != (end is None) or type(files) is not list:
            raise BadRequest(
                "install done must be a boolean, true exactly when next is null, and files a list"
            )
        entries = [check_entry(shard, self.nshards, e) for e in files]
        incoming = self._incoming.get(shard)
        if incoming is None or incoming.num != num or incoming.cursor != start:
            # A replayed, duplicated or stale chunk: already applied, or for
            # a move that is over. Idempotent: nothing changes.
            return {"ok": True, "applied": False}
        final: _ShardState | None = None
        if done:
            final = _ShardState(revision=_check_revision(wire["revision"]))
            final.restore_sessions(wire["sessions"], shard)
        # Checked whole before anything is staged: a bad chunk changes nothing.
        # Only the files this chunk touches are looked at: a shard of many
        # files arrives in many chunks, and a pass over everything staged
        # per chunk would make the whole transfer quadratic.
        staged_len: dict[str, int] = {}
        totals: dict[str, int] = {}

        def note(name: str, total: int) -> None:
            if name not in staged_len:
                staged = incoming.files.get(name)
                staged_len[name] = len(staged[1]) if staged is not None else 0
                totals[name] = incoming.totals.get(name, total)

        for name, _version, offset, hashes, total, _mod in entries:
            note(name, total)
            have = staged_len[name]
            if offset != have or (offset and totals[name] != total):
                raise BadRequest(
                    f"install: piece of {name!r} at {offset} does not follow the {have} staged"[:200]
                )
            staged_len[name] = offset + len(hashes)
            totals[name] = total
        if final is not None:
            # By the cursor's invariant, only the file the cursor names can
            # be incomplete among those staged before this chunk.
            if start is not None and start[1] > 0:
                note(start[0], -1)
            short = [n for n, length in staged_len.items() if length != totals[n]]
            if short:
                raise BadRequest(f"install: last chunk leaves {len(short)} file(s) incomplete")
        for name, version, offset, hashes, total, mod in entries:
            if offset == 0:
                incoming.files[name] = (version, list(hashes))
                incoming.totals[name] = total
                if mod:
                    incoming.mods[name] = mod
            else:
                incoming.files[name][1].extend(hashes)
        incoming.cursor = end
        if final is None:
            return {"ok": True, "applied": True}
        for name, (version, hashes) in incoming.files.items():
            final.files[name] = (version, _TOMBSTONE_LIST if hashes == [TOMBSTONE] else tuple(hashes))
        feed = {"mod": incoming.mods, "history": wire.get("history", []), "compacted": wire.get("compacted")}
        if "history" not in wire:
            feed = {}  # from a group that kept no feed: it starts here
        final.restore_feed(feed, shard)
        del self._incoming[shard]
        self._shards[shard] = final
        self._shards = dict(sorted(self._shards.items()))
        return {"ok": True, "applied": True, "installed": shard}

    def _apply_delete(self, wire: dict[str, Any]) -> dict[str, Any]:
        num, shard = self._shard_command(wire, "delete")
        outgoing = self._outgoing.get(shard)
        if outgoing is not None and outgoing.num == num:
            del self._outgoing[shard]
            return {"ok": True, "deleted": True}
        if num > self.config_num:
            # Not yet at that map: the target cannot have installed from us.
            return _error(
                ErrorCode.NOT_READY, f"group is at map {self.config_num}, not {num}", num=self.config_num
            )
        return {"ok": True, "deleted": False}  # done before (or never ours): idempotent

    def snapshot(self) -> bytes:
        """Every shard held, serving or in transit, in canonical CBOR (equal
        states, equal bytes)."""
        return self.snapshot_copy()()

    def snapshot_copy(self) -> Callable[[], bytes]:
        """A consistent copy of the state now, and the function that encodes
        it into what ``snapshot()`` returns (``raft.interfaces.ISnapshotCopy``).

        The copy is cheap next to the encoding: a dict copy per shard (file
        entries are immutable tuples, shared) and the small dedup tables.
        The encoding may then run in a thread while ``apply`` goes on: it
        reads only the copy, and encodes the file maps a slice at a time so
        the event loop gets the GIL between slices.
        """
        shards = {shard: _ShardCopy.of(state) for shard, state in self._shards.items()}
        outgoing = {
            shard: (out.num, out.target, list(out.addresses), _ShardCopy.of(out.state))
            for shard, out in self._outgoing.items()
        }
        head = {
            "format": FORMAT,
            "nshards": self.nshards,
            "config": self.config_num,
            "incoming": {shard: inc.to_wire() for shard, inc in self._incoming.items()},
        }

        def encode() -> bytes:
            wire: dict[str, Any] = dict(head)
            wire["shards"] = {shard: copy.to_wire() for shard, copy in shards.items()}
            wire["outgoing"] = {
                shard: {"num": num, "to": target, "addrs": addrs, "state": copy.to_wire()}
                for shard, (num, target, addrs, copy) in outgoing.items()
            }
            # Into a BytesIO a piece at a time, whose getvalue() hands over
            # its buffer without a copy: no single step copies the whole
            # state while holding the GIL.
            out = io.BytesIO()
            cbor2.dump(wire, out, canonical=True, default=_write_raw)
            return out.getvalue()

        return encode

    def restore(self, data: bytes) -> None:
        """Replace the whole state with ``snapshot()`` output (format 1 or 2).
        ``BadRequest`` (and no change) if it is malformed or for another
        shard count."""
        wire = _decode(data, "snapshot")
        required = {"format", "nshards", "shards"}
        optional = {"config", "incoming", "outgoing"}
        if not isinstance(wire, dict) or not required <= set(wire) <= required | optional:
            raise BadRequest("snapshot must be a map with format, nshards, shards and the optional parts")
        config_num = wire.get("config", 0)
        if not isinstance(config_num, int) or isinstance(config_num, bool) or config_num < 0:
            raise BadRequest(f"snapshot config must be a map number, not {config_num!r}")
        if wire["format"] not in _READABLE_FORMATS:
            raise BadRequest(f"snapshot has format {wire['format']!r}, this node reads {_READABLE_FORMATS}")
        if wire["nshards"] != self.nshards:
            raise BadRequest(f"snapshot is for {wire['nshards']!r} shards, this cluster has {self.nshards}")
        parts = {k: wire.get(k, {}) for k in ("shards", "incoming", "outgoing")}
        if not all(isinstance(v, dict) for v in parts.values()):
            raise BadRequest("snapshot shards, incoming and outgoing must be maps")
        for part in parts.values():
            for shard in part:
                self._shard_arg(shard)
        shards = {s: _ShardState.from_wire(w, s, self.nshards) for s, w in parts["shards"].items()}
        incoming = {s: Incoming.from_wire(w, s, self.nshards) for s, w in parts["incoming"].items()}
        outgoing: dict[int, _Outgoing] = {}
        for s, w in parts["outgoing"].items():
            if not isinstance(w, dict) or set(w) != {"num", "to", "addrs", "state"}:
                raise BadRequest(f"snapshot: outgoing shard {s} is malformed")
            outgoing[s] = _Outgoing(
                check_num(w["num"]),
                check_gid(w["to"]),
                check_addresses(w["addrs"]),
                _ShardState.from_wire(w["state"], s, self.nshards),
            )
        if len(set(shards) | set(incoming) | set(outgoing)) != len(shards) + len(incoming) + len(outgoing):
            raise BadRequest("snapshot: a shard is both serving and in transit")
        self._shards = dict(sorted(shards.items()))
        self._incoming = dict(sorted(incoming.items()))
        self._outgoing = dict(sorted(outgoing.items()))
        self.config_num = config_num
        if self.moving:
            self._tell_moving()

    # -- shards in transit ------------------------------------------------

    def _tell_moving(self) -> None:
        for observer in list(self.on_moving):
            try:
                observer()
            except Exception:
                self.log.failure("on_moving observer {observer!r} failed", observer=observer)

    @property
    def moving(self) -> bool:
        """Some shard is still arriving or leaving: no new map is taken."""
        return bool(self._incoming or self._outgoing)

    def incoming(self) -> dict[int, Incoming]:
        """Shards being pulled: shard -> its record (the caller must not change it)."""
        return dict(self._incoming)

    def outgoing(self) -> dict[int, tuple[int, int, tuple[str, ...]]]:
        """Frozen shards waiting for their target: shard -> (num, target gid,
        target addresses)."""
        return {s: (o.num, o.target, o.addresses) for s, o in self._outgoing.items()}

    def installed(self, num: int, shard: int) -> bool:
        """Whether this group, the target of ``shard`` under map ``num``, has
        installed it: it is past that map, or at it with the shard no longer
        arriving (a group cannot take a later map with a shard in transit).
        ``BadRequest`` if this group did not gain the shard under ``num``."""
        check_num(num)
        self._shard_arg(shard)
        if self.config_num > num:
            return True
        if self.config_num < num:
            return False
        incoming = self._incoming.get(shard)
        if incoming is not None:
            return False
        if shard not in self._shards and shard not in self._outgoing:
            raise BadRequest(f"shard {shard} did not come to this group under shard map {num}")
        return True

    def transfers(self) -> list[dict[str, Any]]:
        """Every shard in transit here, for status pages."""
        rows: list[dict[str, Any]] = []
        for shard, inc in self._incoming.items():
            rows.append(
                {
                    "shard": shard,
                    "num": inc.num,
                    "from": inc.source,
                    "state": "incoming",
                    "files_received": len(inc.files),
                }
            )
        for shard, out in self._outgoing.items():
            rows.append(
                {
                    "shard": shard,
                    "num": out.num,
                    "to": out.target,
                    "state": "outgoing",
                    "files": len(out.state.files),
                }
            )
        return sorted(rows, key=lambda r: (r["shard"], r["state"]))

    def fetch_chunk(
        self, num: int, shard: int, cursor: Cursor, max_bytes: int = CHUNK_BYTES
    ) -> dict[str, Any]:
        """The chunk of frozen shard ``shard`` (leaving under map ``num``)
        that starts at ``cursor``: ``{"files", "next", "done"}`` plus, when
        done, ``"sessions"`` and ``"revision"``. Any replica that has
        applied map ``num`` answers alike (the copy is frozen).

        ``NotReady`` if this replica has not applied map ``num`` yet;
        ``BadRequest`` if the shard is not leaving this group under ``num``
        (a wrong or stale map number, or not this group's shard)."""
        check_num(num)
        self._shard_arg(shard)
        if not MIN_CHUNK_BYTES <= max_bytes <= MAX_CHUNK_BYTES:
            raise BadRequest(f"max_bytes must be {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}")
        if self.config_num < num:
            raise NotReady(
                f"this replica is at shard map {self.config_num}, not yet {num}", num=self.config_num
            )
        outgoing = self._outgoing.get(shard)
        if outgoing is None or outgoing.num != num:
            raise BadRequest(
                f"shard {shard} is not leaving this group under shard map {num} (the group is at {self.config_num})"
            )
        state = outgoing.state
        entries, end = build_chunk(state.files, outgoing.sorted_names(), cursor, max_bytes, state.mod)
        chunk: dict[str, Any] = {"files": entries, "next": cursor_to_wire(end), "done": end is None}
        if end is None:
            chunk["sessions"] = state.sessions_to_wire()
            chunk["revision"] = state.revision
            chunk["history"] = [list(h) for h in state.history]
            chunk["compacted"] = state.compacted
        return chunk

    # -- reads ----------------------------------------------------------------

    def getfileinfo(self, name: str) -> FileInfo | None:
        """``(version, hashlist)`` of ``name``, or None if it never existed
        (SurfStore's version 0). Tombstoned files return ``(v, ("0",))``.
        ``WrongGroup`` if this group does not serve the name's shard."""
        validate_filename(name)
        return self._owned_state(name).files.get(name)

    def version_of(self, name: str) -> int:
        """The stored version of ``name`` (0 if it never existed)."""
        info = self.getfileinfo(name)
        return info[0] if info is not None else 0

    def getfileinfomap(self) -> dict[str, FileInfo]:
        """Every file of every owned shard, tombstones included."""
        result: dict[str, FileInfo] = {}
        for state in self._shards.values():
            result.update(state.files)
        return result

    def shard_files(self, shards: Iterable[int]) -> tuple[dict[str, FileInfo], list[int]]:
        """The files of those of ``shards`` this group serves, and the ones
        it does not serve (in transit, or another group's)."""
        files: dict[str, FileInfo] = {}
        missing: list[int] = []
        for shard in sorted(set(shards)):
            state = self._shards.get(self._shard_arg(shard))
            if state is None:
                missing.append(shard)
            else:
                files.update(state.files)
        return files, missing

    def list_shard(self, shard: int, after: str, limit: int, max_hashes: int) -> dict[str, Any] | None:
        """A page of a served shard's files in name order, after ``after``:
        at most ``limit`` files and about ``max_hashes`` block hashes (at
        least one file), with the shard's revision (pages read at different
        revisions may disagree: the client compares them). None if this
        group does not serve the shard now."""
        state = self._shards.get(self._shard_arg(shard))
        if state is None:
            return None
        names = state.sorted_names()
        start = bisect.bisect_right(names, after)
        files: list[list[Any]] = []
        hashes = 0
        mod = state.mod
        for name in names[start : start + limit]:
            version, hashlist = state.files[name]
            if files and hashes + len(hashlist) > max_hashes:
                break
            files.append([name, version, list(hashlist), mod.get(name, 0)])
            hashes += len(hashlist)
        more = start + len(files) < len(names)
        return {"revision": state.revision, "files": files, "more": more}

    def changes(self, shard: int, since: int, limit: int, max_hashes: int) -> dict[str, Any] | None:
        """The change feed of a served shard: every write after revision
        ``since``, in revision order, at most ``limit`` of them and about
        ``max_hashes`` block hashes (at least one write): ``{"compacted":
        False, "revision", "changes": [[revision, name, version, hashlist or
        None]...], "next", "more"}``, where ``next`` is the revision to ask
        from next and a write later replaced carries None for its hash list.
        When the feed no longer reaches back to ``since``: ``{"compacted":
        True, "revision", "oldest"}`` (list the shard instead). A ``since``
        past the shard's revision is refused (``BadRequest``). None if this
        group does not serve the shard now."""
        state = self._shards.get(self._shard_arg(shard))
        if state is None:
            return None
        return state.changes(since, limit, max_hashes)

    def revision_of(self, shard: int) -> int | None:
        """The revision of a served shard (None if not served now)."""
        state = self._shards.get(shard)
        return None if state is None else state.revision

    def shard_sizes(self) -> dict[int, tuple[int, int, int]]:
        """``{shard: (files, dedup sessions, revision)}`` of the shards served."""
        return {shard: (len(s.files), len(s.dedup), s.revision) for shard, s in self._shards.items()}

    def stats(self) -> dict[str, Any]:
        """Sizes for status pages and benchmarks."""
        return {
            "owned_shards": sorted(self._shards),
            "shard_map": self.config_num,
            "files": sum(len(s.files) for s in self._shards.values()),
            "sessions": sum(len(s.dedup) for s in self._shards.values()),
            "moving": self.transfers(),
        }
