# -*- test-case-name: tests.test_migration_state -*-
"""Shard hand-off between groups: what moves, in what pieces, and the
records each side keeps while a shard is in transit.

A shard moves under shard map ``num`` from the group that held it under
``num - 1`` (the *source*) to the group that holds it under ``num`` (the
*target*), as 6.824's shardkv and MongoDB's chunk migration do:

1. Both groups apply map ``num`` through their own logs (``OP_CONFIG``). The
   source freezes the shard (``Outgoing``): from that log position on it
   serves nothing for it, and keeps its data unchanged. The target records
   it as ``Incoming`` and serves nothing for it either.
2. The target's leader pulls the frozen copy in chunks
   (``shard_fetch(num, shard, cursor)``, answered by any source replica
   that has applied ``num``: the copy is frozen, so no leadership round is
   needed), and commits each chunk through its own log (``OP_INSTALL``).
   The last chunk carries the dedup sessions and the shard's revision, and
   its commit makes the shard serve on the target.
3. The source's leader asks the target whether it has installed the shard
   (``shard_installed(num, shard)``, a linearizable read on the target's
   leader) and, once it has, deletes its frozen copy through its own log
   (``OP_DELETE``). Deletion is the source's own decision on a fact it
   checked: no call can make a group drop data that has not arrived.

A group takes map ``num + 1`` only when no shard of it is ``Incoming`` or
``Outgoing``. Every step is a committed command, so a restart (or a snapshot)
at any point resumes the move where it was.

Chunks: files go in name order; a chunk holds whole files up to a byte
budget, and a file whose hash list alone is over the budget is cut into
pieces of its hash list (``[name, version, offset, hashes, total]``), so a
shard of any size, and a file of ``MAX_HASHLIST`` hashes, moves without one
frame having to hold it. A chunk names the cursor it starts at and the one
it ends at; the target applies a chunk only when it starts at the cursor
already committed, so a replayed or duplicated chunk changes nothing.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

from surfshard.errors import BadRequest
from surfshard.keyspace import (
    MAX_HASHLIST,
    MAX_VERSION,
    TOMBSTONE,
    joined_hashes,
    shard_of,
    validate_block_hash,
    validate_filename,
    validate_version,
)

#: The byte budget of one chunk unless the caller asks for another, and the
#: bounds it may ask within (a chunk is one RPC reply and one Raft entry).
CHUNK_BYTES = 1024 * 1024
MIN_CHUNK_BYTES = 4 * 1024
MAX_CHUNK_BYTES = 8 * 1024 * 1024

#: Bytes a hash costs in a chunk's CBOR (64 characters and a 2-byte head).
_HASH_BYTES = 66
#: Bytes a file entry costs beyond its name and hashes (version, offset,
#: total, list heads).
_ENTRY_BYTES = 32

#: A cursor: the next piece to send is file ``name`` from hash ``offset``
#: (``None``: from the first file).
Cursor = tuple[str, int] | None


def cursor_to_wire(cursor: Cursor) -> list[Any] | None:
    return None if cursor is None else [cursor[0], cursor[1]]


def cursor_from_wire(wire: Any, what: str = "cursor") -> Cursor:
    if wire is None:
        return None
    if not (type(wire) is list and len(wire) == 2 and type(wire[1]) is int and 0 <= wire[1] <= MAX_HASHLIST):
        raise BadRequest(f"{what} must be null or [name, offset], not {wire!r}"[:200])
    return validate_filename(wire[0]), wire[1]


def check_num(num: Any, what: str = "num") -> int:
    if type(num) is not int or not 1 <= num <= MAX_VERSION:
        raise BadRequest(f"{what} must be a shard map number >= 1, not {num!r}"[:200])
    return num


def check_gid(gid: Any, what: str = "gid") -> int:
    if type(gid) is not int or not 1 <= gid < 1 << 63:
        raise BadRequest(f"{what} must be a group id >= 1, not {gid!r}"[:200])
    return gid


def check_addresses(addresses: Any) -> tuple[str, ...]:
    if type(addresses) is not list or not 1 <= len(addresses) <= 32:
        raise BadRequest("addresses must be a list of 1..32 host:port strings")
    for a in addresses:
        if type(a) is not str or not 0 < len(a) <= 300:
            raise BadRequest(f"bad address {a!r}"[:200])
    return tuple(addresses)


@dataclass
class Incoming:
    """A shard this group owns under map ``num`` and is still pulling from
    group ``source`` (which held it under ``num - 1``, at ``addresses``)."""

    num: int
    source: int
    addresses: tuple[str, ...]
    #: Where the next chunk starts. Invariant: every staged file before it is
    #: complete, and the file it names holds exactly ``offset`` hashes.
    cursor: Cursor = None
    #: Files received so far: name -> (version, hashes so far).
    files: dict[str, tuple[int, list[str]]] = field(default_factory=dict)
    #: Hash-list length each staged file will have once complete.
    totals: dict[str, int] = field(default_factory=dict)
    #: Each staged file's revision of its last change in the source (its
    #: mod revision travels with it; absent: 0).
    mods: dict[str, int] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {
            "num": self.num,
            "from": self.source,
            "addrs": list(self.addresses),
            "cursor": cursor_to_wire(self.cursor),
            "files": {n: [v, h, self.totals[n], self.mods.get(n, 0)] for n, (v, h) in self.files.items()},
        }

    @classmethod
    def from_wire(cls, wire: Any, shard: int, nshards: int) -> Incoming:
        if type(wire) is not dict or set(wire) != {"num", "from", "addrs", "cursor", "files"}:
            raise BadRequest(f"incoming shard {shard}: malformed record")
        incoming = cls(
            check_num(wire["num"]),
            check_gid(wire["from"]),
            check_addresses(wire["addrs"]),
            cursor_from_wire(wire["cursor"]),
        )
        if type(wire["files"]) is not dict:
            raise BadRequest(f"incoming shard {shard}: files must be a map")
        for name, info in wire["files"].items():
            if type(info) is not list or len(info) not in (3, 4):
                raise BadRequest(
                    f"incoming shard {shard}: file {name!r} must be [version, hashes, total, mod]"[:200]
                )
            version, hashes, total = info[:3]
            mod = check_entry(shard, nshards, [name, version, 0, hashes, total, *info[3:]])[5]
            incoming.files[name] = (version, list(hashes))
            incoming.totals[name] = total
            if mod:
                incoming.mods[name] = mod
        return incoming


def check_entry(shard: int, nshards: int, entry: Any) -> tuple[str, int, int, list[str], int, int]:
    """Validate one chunk entry ``[name, version, offset, hashes, total,
    mod]`` (``mod``, the file's revision of its last change, may be left
    off: 0)."""
    if type(entry) is not list or len(entry) not in (5, 6):
        raise BadRequest("a chunk entry must be [name, version, offset, hashes, total, mod]")
    name, version, offset, hashes, total = entry[:5]
    mod = entry[5] if len(entry) == 6 else 0
    if type(mod) is not int or not 0 <= mod <= MAX_VERSION:
        raise BadRequest(f"file {name!r}: bad mod revision {mod!r}"[:200])
    validate_filename(name)
    if shard_of(name, nshards) != shard:
        raise BadRequest(f"file {name!r} belongs to shard {shard_of(name, nshards)}, not {shard}"[:200])
    validate_version(version)
    if type(total) is not int or not 0 <= total <= MAX_HASHLIST:
        raise BadRequest(f"file {name!r}: bad total {total!r}"[:200])
    if (
        type(offset) is not int
        or type(hashes) is not list
        or not 0 <= offset <= offset + len(hashes) <= total
    ):
        raise BadRequest(f"file {name!r}: piece outside its hash list"[:200])
    if hashes == [TOMBSTONE] and offset == 0 and total == 1:
        return name, version, offset, hashes, total, mod
    if hashes and joined_hashes(hashes) is None:  # one pass over the list; the slow path says why
        for h in hashes:
            validate_block_hash(h)
    return name, version, offset, hashes, total, mod


def build_chunk(
    files: dict[str, tuple[int, tuple[str, ...]]],
    names: list[str],
    cursor: Cursor,
    max_bytes: int,
    mod: dict[str, int] | None = None,
) -> tuple[list[list[Any]], Cursor]:
    """The entries of the chunk that starts at ``cursor`` in a frozen shard
    (``names``: its file names, sorted), and the cursor after it (``None``
    once the last file is in). Always makes progress: a chunk holds at least
    one hash, or one whole file with an empty or tombstone list."""
    entries: list[list[Any]] = []
    budget = max_bytes
    if cursor is None:
        i, offset = 0, 0
    else:
        name, offset = cursor
        i = bisect.bisect_left(names, name)
        if i == len(names) or names[i] != name:
            offset = 0  # a cursor naming no file starts at the next one
    while i < len(names):
        name = names[i]
        version, hashes = files[name]
        head = len(name.encode("utf-8")) + _ENTRY_BYTES
        room = (budget - head) // _HASH_BYTES
        left = len(hashes) - offset
        if room < left and (entries or room < 1):
            if entries:
                return entries, (name, offset)
            room = 1  # the first piece of a chunk: progress whatever the budget
        take = min(left, room)
        entry = [name, version, offset, list(hashes[offset : offset + take]), len(hashes)]
        if mod and offset == 0 and name in mod:
            entry.append(mod[name])
        entries.append(entry)
        budget -= head + take * _HASH_BYTES
        if take < left:
            return entries, (name, offset + take)
        i, offset = i + 1, 0
        if budget <= _ENTRY_BYTES:
            return entries, (names[i], 0) if i < len(names) else None
    return entries, None
