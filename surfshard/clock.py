"""Run a real reactor's timers on the monotonic clock.

Twisted's reactors schedule ``callLater`` by ``time.time``: if the system
clock is stepped back, every ``LoopingCall`` stalls (a leader stops sending
heartbeats); stepped forward, election timers fire early. Raft timing must
follow elapsed time, so server processes switch their reactor to
``time.monotonic`` before any protocol timer is scheduled.
"""

from __future__ import annotations

import heapq
import time
from typing import Any

from twisted.logger import Logger

log = Logger()


def use_monotonic_clock(reactor: Any) -> None:
    """Make ``reactor.seconds`` monotonic; reschedules the few timers that
    may already exist (e.g. twistd's own) so none is lost or fires early."""
    if getattr(reactor, "seconds", None) is time.monotonic:
        return
    pending = []
    for call in reactor.getDelayedCalls():
        pending.append((call, call.getTime() - reactor.seconds()))
    reactor.seconds = time.monotonic
    for call, delay in pending:
        # A DelayedCall keeps the clock function it was made with; give it
        # the monotonic one, then re-aim it at the same remaining delay.
        call.seconds = time.monotonic
        call.time = time.monotonic() + max(0.0, delay)
    if pending:
        # The reactor keeps its timers in a heap ordered by time: rebuild it.
        heapq.heapify(reactor._pendingTimedCalls)
        log.debug("rescheduled {n} timers onto the monotonic clock", n=len(pending))
