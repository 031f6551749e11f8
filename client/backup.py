# -*- test-case-name: tests.test_backup -*-
"""Backups of the file map, and restoring one: ``surfshard backup`` and
``surfshard restore``.

A backup is every file of every shard as a listing found it (``list_all``:
each shard read at one revision, which the backup's cursor records), written
as JSON Lines: a header line, then ``[name, version, hashlist]`` a line,
tombstones included. It holds no blocks: those stay on the block stores,
and ``surfshard blocks gc --keep BACKUP`` keeps the ones a backup names.

Restoring writes, through the ordinary ``updatefile`` path, every file of the
backup whose content the cluster no longer has, as the file's next version
(version 1 if the cluster has no such file): what a person undoing a mistake
wants, and what every sync client then takes as a change made elsewhere.
So nothing about the cluster's versions, exactly-once table or change feed
is bypassed. A restore only brings content back, it never deletes: files
the backup does not have, or has as deleted, are left as they are. A file
whose blocks no store has is left out and named; a file written by someone
else while the restore runs is left as they wrote it.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from twisted.internet import defer

from client.sync import write_atomically
from surfshard import errors
from surfshard.keyspace import is_tombstone, validate_filename, validate_hashlist

__all__ = ["BackupError", "read_backup", "restore", "take_backup", "write_backup"]

#: The first line's marker and the format's version.
FORMAT = "surfshard-backup"
FORMAT_VERSION = 1
#: Updates a restore keeps in flight.
RESTORE_CONCURRENCY = 64

Files = dict[str, tuple[int, list[str]]]


class BackupError(errors.BadRequest):
    """A backup file that cannot be read as one (nothing was written)."""


def write_backup(path: Path, files: Files, *, cluster: str, shards: int, cursor: str) -> None:
    """Write ``files`` to ``path``, whole or not at all: a temporary file
    beside it, synced, then renamed over it."""
    header = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "cluster": cluster,
        "shards": shards,
        "cursor": cursor,
        "taken": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "files": len(files),
    }

    def lines() -> Iterator[bytes]:
        yield (json.dumps(header, sort_keys=True) + "\n").encode("utf-8")
        for name in sorted(files):
            version, hashlist = files[name]
            yield (json.dumps([name, version, hashlist], ensure_ascii=False) + "\n").encode("utf-8")

    write_atomically(path, lines(), durable_name=True)


def read_backup(path: Path) -> tuple[dict[str, Any], Files]:
    """``(header, files)`` of the backup at ``path``, every line checked as
    the servers check a write; ``BackupError`` names the first bad line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BackupError(f"{path}: cannot read it: {e}") from None
    if not lines:
        raise BackupError(f"{path}: empty, not a backup")
    try:
        header = json.loads(lines[0])
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise BackupError(f"{path}: line 1: not a SurfShard backup")
    if header.get("version") != FORMAT_VERSION:
        raise BackupError(
            f"{path}: line 1: backup format {header.get('version')!r}, this surfshard reads {FORMAT_VERSION}"
        )
    files: Files = {}
    for number, line in enumerate(lines[1:], 2):
        try:
            entry = json.loads(line)
            if not (isinstance(entry, list) and len(entry) == 3):
                raise errors.BadRequest("expected [name, version, hashlist]")
            name, version, hashlist = entry
            validate_filename(name)
            if isinstance(version, bool) or not isinstance(version, int) or version < 1:
                raise errors.BadRequest(f"version {version!r} is not a positive integer")
            validate_hashlist(hashlist)
        except (ValueError, errors.BadRequest) as e:
            raise BackupError(f"{path}: line {number}: {getattr(e, 'message', e)}") from None
        if name in files:
            raise BackupError(f"{path}: line {number}: {name!r} appears twice")
        files[name] = (version, list(hashlist))
    if header.get("files") != len(files):
        raise BackupError(
            f"{path}: the header counts {header.get('files')!r} files, {len(files)} were read (cut short?)"
        )
    return header, files


@defer.inlineCallbacks
def take_backup(client: Any) -> Any:
    """``(files, cursor text)``: every file of the cluster, as ``list_all``
    finds it."""
    from client.feed import list_all

    files, cursor = yield list_all(client)
    return {name: (v, list(h)) for name, (v, h) in files.items()}, cursor.encode()


@defer.inlineCallbacks
def restore(
    client: Any,
    present: Callable[[list[str]], Any],
    files: Files,
    *,
    dry_run: bool = False,
    only: list[str] | None = None,
) -> Any:
    """Bring back the content of every live file of ``files`` (see the
    module doc). ``present(hashes)``: a Deferred of ``(the set of those
    blocks some store has, the stores that did not answer)``. Returns the
    report ``surfshard restore`` prints: ``restored``, ``blocks_missing``
    and ``changed_meanwhile`` (names); ``unchanged``, ``left_deleted``
    (alive now, deleted in the backup) and ``not_in_backup`` (counts); and
    ``unreachable`` (stores). ``only``: patterns with a ``.gitignore``'s
    rules (``photos/``, ``*.jpg``, ``docs/plan.txt``); only the files they
    match are looked at (``chosen``: how many)."""
    from client.feed import list_all
    from client.sync import Ignore

    # The patterns read as a .gitignore is (``Ignore``'s rules: a pattern
    # without ``/`` matches a name at any depth, ``photos/`` a folder and
    # everything in it, ``!`` takes a name back).
    within: Callable[[str], bool] = Ignore(only) if only else (lambda _name: True)
    files = {name: info for name, info in files.items() if within(name)}

    now, _cursor = yield list_all(client)
    report: dict[str, Any] = {
        "dry_run": dry_run,
        "chosen": len(files),
        "restored": [],
        "unchanged": 0,
        "left_deleted": 0,
        "blocks_missing": [],
        "changed_meanwhile": [],
        "not_in_backup": sum(
            1 for name, (_v, h) in now.items() if name not in files and not is_tombstone(h) and within(name)
        ),
        "unreachable": [],
    }
    todo: list[tuple[str, int, list[str]]] = []
    for name in sorted(files):
        _version, hashlist = files[name]
        current = now.get(name)
        if is_tombstone(hashlist):
            if current is not None and not is_tombstone(current[1]):
                report["left_deleted"] += 1  # a restore never deletes
            continue
        if current is None:
            todo.append((name, 1, hashlist))
        elif list(current[1]) == hashlist:
            report["unchanged"] += 1
        else:
            todo.append((name, current[0] + 1, hashlist))
    wanted = sorted({h for _name, _version, hashlist in todo for h in hashlist})
    have, report["unreachable"] = (yield present(wanted)) if wanted else (set(), [])
    writes = []
    for name, version, hashlist in todo:
        if set(hashlist) <= have:
            writes.append((name, version, hashlist))
        else:
            report["blocks_missing"].append(name)
    if dry_run:
        report["restored"] = [name for name, _version, _hashlist in writes]
        return report
    semaphore = defer.DeferredSemaphore(RESTORE_CONCURRENCY)

    def one(name: str, version: int, hashlist: list[str]) -> defer.Deferred:
        def done(_version: Any) -> None:
            report["restored"].append(name)

        def failed(failure: Any) -> None:
            # Someone wrote it since the listing: theirs stands.
            failure.trap(errors.VersionMismatch)
            report["changed_meanwhile"].append(name)

        d = semaphore.run(client.updatefile, name, version, hashlist)
        d.addCallbacks(done, failed)
        return d

    yield defer.gatherResults([one(*w) for w in writes], consumeErrors=True)
    for key in ("restored", "changed_meanwhile"):
        report[key].sort()
    return report
