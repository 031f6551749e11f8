# -*- test-case-name: tests.test_loops -*-
"""Background loops that survive their own bugs.

A ``LoopingCall`` stops for good the first time its function raises (or
its Deferred fails), leaving one log line: a shard-map watcher or a shard
migrator stopped that way would leave its group behind, silently, until a
restart. ``polling_loop`` logs each failure with its traceback and polls
again at the next interval.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure


def polling_loop(
    poll: Callable[[], Any], clock: IReactorTime, interval: float, log: Logger, what: str
) -> task.LoopingCall:
    """Start calling ``poll`` every ``interval`` seconds on ``clock`` (not at
    once); a failure of one call is logged as ``what`` and the loop goes on.
    Stop it with ``.stop()``."""

    def guarded() -> defer.Deferred[Any]:
        def failed(failure: Failure) -> None:
            log.failure("{what} failed; polling again in {interval}s", failure, what=what, interval=interval)

        return defer.maybeDeferred(poll).addErrback(failed)

    loop = task.LoopingCall(guarded)
    loop.clock = clock
    loop.start(interval, now=False).addErrback(lambda f: log.failure("{what} loop stopped", f, what=what))
    return loop
