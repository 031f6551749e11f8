# -*- test-case-name: tests.test_watch,tests.test_sync_process -*-
"""``surfshard sync --watch``: sync, then sleep until something changes.

A watch sleeps on three things at once: the change feed's long poll (a
change on the server), the operating system's news of the folder
(``FolderEvents``, through ``watchdog``: inotify on Linux, FSEvents on
macOS), and the interval, the fallback. It keeps one cluster client for all
its syncs, so connections, leader guesses and the shard map stay warm.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from twisted.internet import threads
from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer

from client.sync import (
    CURSOR_NAME,
    HASH_CACHE_NAME,
    INDEX_NAME,
    PENDING_NAME,
    TMP_PREFIX,
    VERSIONS_NAME,
    Ignore,
    IndexFileError,
    read_cursor_file,
    summary,
    sync_folder,
)
from surfshard import errors

__all__ = ["FolderEvents", "ServerPoll", "watch"]

#: Events that mean something in the folder changed (reads, which the scan
#: itself makes, do not).
_CHANGE_EVENTS = frozenset({"created", "modified", "deleted", "moved", "closed"})
#: The sync's own files at the top of the folder, whose writes wake no one
#: (the ignore rules do: a change to them changes what is synced).
_OWN_WRITES = frozenset({INDEX_NAME, CURSOR_NAME, HASH_CACHE_NAME, PENDING_NAME})
#: After a change, the watch waits until the folder has been quiet this long
#: (an editor's save is often several writes), but never longer than
#: ``SETTLE_MAX`` in all.
SETTLE_QUIET = 0.2
SETTLE_MAX = 2.0


class FolderEvents:
    """What changes in a folder, as the operating system reports it
    (``watchdog``: inotify on Linux, FSEvents on macOS), so a watch syncs a
    local edit at once instead of at its next interval. Each change sets
    ``wake`` and ``changed``. The sync's own writes (``_OWN_WRITES``, its
    temporary files) are not changes; its downloads are, and cost one more
    sync that finds nothing to do. Where the folder cannot be watched (no
    inotify watches left, say) ``note`` says so and the watch falls back to
    its interval."""

    def __init__(self, base: Path, wake: threading.Event) -> None:
        self.base = str(base)
        self.wake = wake
        self.changed = threading.Event()
        self.note = ""
        #: The folder's ignore rules as the last sync read them: a change to
        #: a name they match (a log an app keeps writing) wakes no one.
        self.ignore = Ignore()
        self._observer: Any = None
        try:
            observer = Observer()
            observer.schedule(_Handler(self), self.base, recursive=True)
            observer.start()
            self._observer = observer
        except OSError as e:  # no inotify watches left, say
            self.note = f"cannot watch {base} for changes ({e}): looking at it every interval instead"

    def seen(self, event: Any) -> None:
        if event.event_type not in _CHANGE_EVENTS:
            return
        paths = [event.src_path, getattr(event, "dest_path", "")]
        if any(path and not self._unseen(os.fsdecode(path), event.is_directory) for path in paths):
            self.changed.set()
            self.wake.set()

    def _unseen(self, path: str, is_dir: bool) -> bool:
        """Whether a change to ``path`` is none of the sync's business: the
        sync's own writes, or a name the ignore rules match."""
        name = os.path.relpath(path, self.base)
        if name in _OWN_WRITES or os.path.basename(name).startswith(TMP_PREFIX) or name == ".":
            return True
        if name.split(os.sep, 1)[0] == VERSIONS_NAME:
            return True  # the sync keeping what it replaced
        ignore = self.ignore  # replaced whole by the watch's thread: read once
        return bool(ignore) and ignore(name.replace(os.sep, "/"), is_dir=is_dir)

    def settle(self) -> None:
        """Once a change was seen: wait for the folder to be quiet (bounded)."""
        deadline = time.monotonic() + SETTLE_MAX
        while self.changed.is_set() and time.monotonic() < deadline:  # bounded by the deadline
            self.changed.clear()
            self.changed.wait(SETTLE_QUIET)

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)


class _Handler(FileSystemEventHandler):
    """watchdog's callback (on its observer's thread) into ``FolderEvents``."""

    def __init__(self, events: FolderEvents) -> None:
        super().__init__()
        self.events = events

    def on_any_event(self, event: Any) -> None:
        self.events.seen(event)


class ServerPoll:
    """The watch's long poll on the change feed, one out at a time, on the
    reactor. A poll that ends with no change (the server holds one at most
    a minute) is made again at once with the same cursor, so the server is
    never out of sight for the rest of a long interval; a change sets
    ``wake``; a poll that fails sets it after ``retry`` seconds, so the
    next sync says what is wrong and polls anew (not at once: a cluster
    that is down is not asked in a loop)."""

    #: How long one poll waits on the server at most (``wait_for_change``
    #: caps it at a minute too).
    SECONDS = 60.0
    RETRY = 2.0

    def __init__(self, reactor: Any, wait: Any, wake: threading.Event) -> None:
        #: ``wait(cursor, seconds)`` -> Deferred firing True on a change past
        #: ``cursor``, False after ``seconds`` without one.
        self.reactor = reactor
        self.wait = wait
        self.wake = wake
        #: Set while a poll is out (read by the watch's thread).
        self.out = threading.Event()
        self.stopped = False

    def start(self, cursor: Any, seconds: float) -> None:
        """Poll past ``cursor`` (on the reactor), unless a poll is out."""
        if self.out.is_set() or self.stopped:
            return
        self.out.set()
        self._poll(cursor, seconds)

    def stop(self) -> None:
        self.stopped = True

    def _poll(self, cursor: Any, seconds: float) -> None:
        def answered(changed: bool) -> None:
            if changed:
                self.out.clear()
                self.wake.set()
            elif self.stopped:
                self.out.clear()
            else:
                self._poll(cursor, self.SECONDS)  # nothing yet: ask again

        def failed(_failure: Any) -> None:
            self.out.clear()
            if not self.stopped:
                self.reactor.callLater(self.RETRY, self.wake.set)

        self.wait(cursor, seconds).addCallbacks(answered, failed)


#: A watch whose sync failed tries again after this, doubled with each
#: failure in a row, up to ``RETRY_MAX`` (or the interval, if shorter).
RETRY_FIRST = 1.0
RETRY_MAX = 60.0


def retry_pause(failures: int, interval: float) -> float:
    """How long a watch waits after its ``failures``-th failed sync in a row."""
    return min(RETRY_FIRST * 2 ** min(failures - 1, 16), RETRY_MAX, max(interval, RETRY_FIRST))


def watch(base: str | os.PathLike[str], cluster: Any, interval: float, **options: Any) -> None:
    """Sync, then wait for a change: in the folder (``FolderEvents``, at
    once), on the server (a long poll on the change feed), or ``interval``
    seconds, whichever comes first; until interrupted. A sync the cluster
    fails (``SurfShardError``) is said and tried again later; a folder that
    cannot be synced (``IndexFileError``) ends the watch."""
    from client.blocking import _reactor
    from client.cluster import ClusterClient
    from client.feed import Cursor, CursorError, wait_for_change

    reactor = _reactor()
    # One client for every sync and long poll: its connections, leader
    # guesses and shard map stay warm between syncs.
    timeout = options.pop("timeout", 60.0)
    client = threads.blockingCallFromThread(reactor, lambda: ClusterClient(cluster, reactor, timeout=timeout))
    cursor_path = Path(base) / CURSOR_NAME
    wake = threading.Event()
    events = FolderEvents(Path(base), wake)
    if events.note:
        print(events.note, file=sys.stderr, flush=True)
    # One long poll out at a time: a local change wakes the watch while the
    # poll is still out, and that poll, not a new one, tells of the server.
    server = ServerPoll(reactor, lambda cursor, seconds: wait_for_change(client, cursor, seconds), wake)

    failures, last_error = 0, ""
    try:
        while True:  # stopped by Ctrl-C
            wake.clear()
            events.changed.clear()
            started = time.monotonic()
            try:
                result = sync_folder(base, cluster, client=client, **options)
            except errors.SurfShardError as e:
                # The cluster's trouble (stores or a group down, no leader
                # yet), not the folder's: a watch outlives it, as a daemon
                # does, and tries again, less often the longer it lasts.
                failures += 1
                pause = retry_pause(failures, interval)
                if str(e) != last_error:  # said once, not at every try
                    last_error = str(e)
                    print(
                        f"{time.strftime('%H:%M:%S')} sync failed: {e}; trying again in {pause:.0f} s, "
                        "then less often",
                        file=sys.stderr,
                        flush=True,
                    )
                wake.wait(pause)
                continue
            if failures:
                print(
                    f"{time.strftime('%H:%M:%S')} synced again after {failures} failed tries",
                    file=sys.stderr,
                    flush=True,
                )
                failures, last_error = 0, ""
            with contextlib.suppress(IndexFileError):  # the next sync reports it
                events.ignore = Ignore.of(Path(base))
            changed = (
                result.uploaded
                or result.downloaded
                or result.deleted_local
                or result.deleted_remote
                or result.incomplete
            )
            if changed:
                print(f"{time.strftime('%H:%M:%S')} {summary(result)}", file=sys.stderr, flush=True)
            left = max(0.0, interval - (time.monotonic() - started))
            try:
                cursor = Cursor.decode(read_cursor_file(cursor_path)[0], cluster)
            except (OSError, UnicodeDecodeError, CursorError):
                cursor = None
            if cursor is not None and not server.out.is_set():
                reactor.callFromThread(server.start, cursor, left)
            wake.wait(left)
            events.settle()
    finally:
        reactor.callFromThread(server.stop)
        events.stop()
        threads.blockingCallFromThread(reactor, client.close)
