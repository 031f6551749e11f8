"""Listing the namespace once, then following what changes: cursors.

Each shard keeps a revision that grows with every write and travels with
the shard when it moves, and a feed of its recent writes
(``MetadataReplica.changes``; etcd's revisions and watch, Dropbox's
``list_folder/continue``). A ``Cursor`` holds one revision per shard and the
shard-map number it was taken under; it is opaque to callers (``encode`` /
``decode``) and tied to one cluster.

- ``list_all(client)``: every file, shard by shard in pages, and the cursor
  at which the listing stands.
- ``changes_since(client, cursor)``: what changed after the cursor, shard by
  shard (O(shards) calls when nothing did), and the cursor after it. When a
  shard's feed no longer reaches back that far, or the cursor cannot be
  honoured at all (a revision the shard never had: another cluster's cursor
  or a restored backup), it raises ``CursorExpired``: list again. A cursor
  is never silently wrong.
- ``wait_for_change(client, cursor, seconds)``: a long poll on every shard
  at once, firing as soon as one has a write past the cursor (a watch).

A moved shard resumes at its own revision on its new group: the cursor
needs no change when shards move.
"""

from __future__ import annotations

import base64
import binascii
import zlib
from dataclasses import dataclass
from typing import Any

import cbor2
from twisted.internet import defer, task

from surfshard import errors
from surfshard.config import ClusterConfig

#: Changes per page of a ``changes`` call.
CHANGES_PAGE = 5000
_PREFIX = "ssc1."


class CursorError(errors.BadRequest):
    """A cursor that is not one of this cluster's (garbage, edited, or
    another cluster's)."""


class CursorExpired(errors.SurfShardError):
    """The cursor cannot be followed any further (a shard's feed was
    compacted past it, or the shard never had its revision): list again."""

    code = errors.ErrorCode.BAD_REQUEST


@dataclass(frozen=True)
class Cursor:
    """Where a listing or a change feed stands: a revision per shard.
    Invariant: ``len(revisions) == nshards``, each >= 0."""

    cluster: str
    nshards: int
    num: int
    revisions: tuple[int, ...]

    def encode(self) -> str:
        body = cbor2.dumps([self.cluster, self.nshards, self.num, list(self.revisions)])
        check = zlib.crc32(body).to_bytes(4, "big")
        return _PREFIX + base64.urlsafe_b64encode(body + check).decode("ascii").rstrip("=")

    @classmethod
    def decode(cls, text: str, cluster: ClusterConfig) -> Cursor:
        """The cursor ``text`` encodes; ``CursorError`` saying why not, if it
        is not a cursor of ``cluster``."""
        if not isinstance(text, str) or not text.startswith(_PREFIX) or len(text) > 1 << 20:
            raise CursorError("not a SurfShard cursor")
        raw = text[len(_PREFIX) :]
        try:
            data = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
        except (binascii.Error, ValueError):
            raise CursorError("not a SurfShard cursor (bad encoding)") from None
        body, check = data[:-4], data[-4:]
        if len(data) < 5 or zlib.crc32(body).to_bytes(4, "big") != check:
            raise CursorError("not a SurfShard cursor (checksum mismatch: damaged or edited)")
        try:
            name, nshards, num, revisions = cbor2.loads(body)
        except Exception:
            raise CursorError("not a SurfShard cursor (malformed body)") from None
        if not isinstance(name, str) or name != cluster.name:
            raise CursorError(f"a cursor of cluster {name!r}, not of {cluster.name!r}")
        if nshards != cluster.shards or type(revisions) is not list or len(revisions) != nshards:
            raise CursorError(f"a cursor for {nshards} shards; cluster {cluster.name!r} has {cluster.shards}")
        if type(num) is not int or num < 0 or not all(type(r) is int and r >= 0 for r in revisions):
            raise CursorError("not a SurfShard cursor (bad revisions)")
        return cls(name, nshards, num, tuple(revisions))


@defer.inlineCallbacks
def _map_num(client: Any):
    if client.cluster.static:
        return 0
    shard_map = yield client.shard_map()
    return shard_map.num


@defer.inlineCallbacks
def list_all(client: Any):
    """``(files, cursor)``: every file ``{name: [version, hashlist]}`` and
    the cursor at which the listing stands (per shard, the revision of its
    first page: changes after it, replayed over the listing with the newer
    version winning, bring it up to date)."""
    revisions: dict[int, int] = {}

    @defer.inlineCallbacks
    def fetch(group: Any, shard: int, timeout: float):
        found = yield client.list_shard_at(group, shard, timeout)
        if found is None:
            return None
        files, revision = found
        revisions[shard] = revision
        return files

    parts = yield client.per_shard(list(range(client.cluster.shards)), fetch)
    files: dict[str, Any] = {}
    for part in parts.values():
        files.update(part)
    num = yield _map_num(client)
    cursor = Cursor(
        client.cluster.name,
        client.cluster.shards,
        num,
        tuple(revisions[s] for s in range(client.cluster.shards)),
    )
    return files, cursor


@defer.inlineCallbacks
def _shard_changes(group: Any, shard: int, since: int, timeout: float):
    """All of one shard's writes after ``since``: ``(writes, revision)``,
    writes ``[[revision, name, version, hashlist or None]...]``; None if the
    group does not serve the shard; ``CursorExpired`` if it cannot."""
    writes: list[list[Any]] = []
    # Bounded: each page moves ``since`` on, and the shard's revision is finite.
    while True:
        try:
            page = yield group.changes(shard, since, CHANGES_PAGE, 0.0, timeout)
        except errors.BadRequest as e:
            raise CursorExpired(f"shard {shard}: {e.message}") from None
        if not page.get("served"):
            return None
        if page.get("compacted"):
            raise CursorExpired(
                f"shard {shard}: its change feed starts after revision {page.get('oldest')}, "
                f"the cursor is at {since}"
            )
        writes.extend(page["changes"])
        since = page["next"]
        if not page["more"]:
            return writes, since


@defer.inlineCallbacks
def writes_since(client: Any, cursor: Cursor):
    """``(writes, cursor)``: every write after ``cursor``, as ``(shard,
    revision, name, version, hashlist or None)`` in revision order within
    each shard (a hash list is None where a later write replaced it), and
    the cursor after them. ``CursorExpired``: list again (``list_all``)."""
    if cursor.nshards != client.cluster.shards or cursor.cluster != client.cluster.name:
        raise CursorError(f"a cursor of cluster {cursor.cluster!r}, not of {client.cluster.name!r}")
    revisions = dict(enumerate(cursor.revisions))

    def fetch(group: Any, shard: int, timeout: float) -> Any:
        return _shard_changes(group, shard, revisions[shard], timeout)

    parts = yield client.per_shard(list(range(cursor.nshards)), fetch)
    writes: list[tuple[int, int, str, int, Any]] = []
    for shard, (shard_writes, revision) in sorted(parts.items()):
        revisions[shard] = revision
        writes.extend((shard, r, name, version, hashlist) for r, name, version, hashlist in shard_writes)
    num = yield _map_num(client)
    return writes, Cursor(
        cursor.cluster, cursor.nshards, num, tuple(revisions[s] for s in range(cursor.nshards))
    )


@defer.inlineCallbacks
def changes_since(client: Any, cursor: Cursor):
    """``(changes, cursor)``: for each file written after ``cursor``, its
    latest ``[version, hashlist]`` (a tombstone for a deletion), and the
    cursor after them. ``CursorExpired``: list again (``list_all``)."""
    writes, after = yield writes_since(client, cursor)
    latest: dict[str, list[Any]] = {}
    for _shard, _revision, name, version, hashlist in writes:
        latest[name] = [version, hashlist]
    for name, (_version, hashlist) in list(latest.items()):
        if hashlist is None:
            # Written again after its page was read (and that write is past
            # the cursor we return): ask for the file as it is.
            info = yield client.getfileinfo(name)
            latest[name] = [info[0], info[1]]
    return latest, after


@defer.inlineCallbacks
def wait_for_change(client: Any, cursor: Cursor, seconds: float):
    """Fires with True as soon as some shard has a write past ``cursor``
    (a long poll on every shard at once), or False after ``seconds``."""
    shard_map = None if client.cluster.static else (yield client.shard_map(refresh=True))
    owners = client.shard_owners(shard_map)
    seconds = max(0.0, min(seconds, 60.0))
    outcome: defer.Deferred[bool] = defer.Deferred()

    def answered(changed: bool) -> None:
        if changed and not outcome.called:
            outcome.callback(True)

    polls = []
    for shard, group in owners.items():
        if group is None:
            continue
        d = group.changes(shard, cursor.revisions[shard], 1, seconds, seconds + 5.0)
        d.addCallback(
            lambda page: bool(page.get("compacted") or page.get("changes") or not page.get("served"))
        )
        d.addErrback(lambda f: True)  # an error: look, the next sync says what it is
        d.addCallback(answered)
        polls.append(d)
    if not polls:
        yield task.deferLater(client.reactor, seconds, lambda: None)
        return False
    # Every poll answered and none said yes: nothing changed.
    defer.DeferredList(polls).addCallback(lambda _: None if outcome.called else outcome.callback(False))
    changed = yield outcome
    for d in polls:
        if not d.called:
            d.cancel()
    return changed
