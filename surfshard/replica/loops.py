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


def guarded(
    poll: Callable[[], Any], log: Logger, what: str, then: str = ""
) -> Callable[[], defer.Deferred[Any]]:
    """``poll`` made safe to run from a timer: a failure (raised, or of the
    Deferred it returns) is logged as ``what`` (followed by ``then``), never
    passed on."""

    def call() -> defer.Deferred[Any]:
        def failed(failure: Failure) -> None:
            log.failure("{what} failed{then}", failure, what=what, then=then)

        return defer.maybeDeferred(poll).addErrback(failed)

    return call


def polling_loop(
    poll: Callable[[], Any], clock: IReactorTime, interval: float, log: Logger, what: str
) -> task.LoopingCall:
    """Start calling ``poll`` every ``interval`` seconds on ``clock`` (not at
    once); a failure of one call is logged as ``what`` and the loop goes on.
    Stop it with ``.stop()``."""
    loop = task.LoopingCall(guarded(poll, log, what, f"; polling again in {interval}s"))
    loop.clock = clock
    loop.start(interval, now=False).addErrback(lambda f: log.failure("{what} loop stopped", f, what=what))
    return loop
