"""Finding a replica group's leader and retrying calls to it.

Shared by the metadata and ShardMaster clients and by groups watching the
ShardMaster (so it lives in the foundation): each talks to a Raft group
whose leader moves, answers NOT_LEADER with a hint, and may be crashed,
partitioned or slow.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from surfshard import errors

#: Errors after which the same call may go to another replica. A write is
#: safe to resend because it carries (client id, sequence number).
RETRYABLE = (errors.NotLeader, errors.Crashed, errors.Timeout, errors.Unavailable)


class Backoff:
    """Capped exponential backoff with full jitter (the AWS architecture
    blog's variant): spreads retries of many clients after a failover."""

    def __init__(self, base: float = 0.02, cap: float = 1.0, rng: random.Random | None = None) -> None:
        self.base = base
        self.cap = cap
        self.rng = rng or random.Random()
        self.attempt = 0

    def next_delay(self) -> float:
        delay = self.rng.uniform(0, min(self.cap, self.base * (2**self.attempt)))
        self.attempt = min(self.attempt + 1, 30)
        return delay

    def reset(self) -> None:
        self.attempt = 0


class LeaderCaller:
    """Sends calls to the leader of one replica group, wherever it is.

    ``pool`` is a ``surfshard.rpc.RpcClientPool`` (anything with
    ``call(address, method, args, timeout) -> Deferred``). The leader guess
    follows NOT_LEADER hints at once; other failures rotate through the
    addresses after a backoff, until the call's overall deadline.
    """

    log = Logger()

    def __init__(
        self,
        pool: Any,
        addresses: Sequence[str],
        reactor: IReactorTime,
        *,
        timeout: float = 30.0,
        attempt_timeout: float = 2.0,
        rng: random.Random | None = None,
    ) -> None:
        if not addresses:
            raise ValueError("a replica group needs at least one address")
        self.pool = pool
        self.addresses = list(addresses)
        self.reactor = reactor
        self.timeout = timeout
        self.attempt_timeout = attempt_timeout
        self.rng = rng or random.Random()
        self.leader: str | None = None
        self._next = 0

    def _guess(self) -> str:
        if self.leader is not None:
            return self.leader
        address = self.addresses[self._next % len(self.addresses)]
        return address

    def _rotate(self, failed: str) -> None:
        if self.leader == failed:
            self.leader = None
        if failed in self.addresses:
            self._next = self.addresses.index(failed) + 1
        else:
            self._next += 1

    @defer.inlineCallbacks
    def call(self, method: str, args: dict[str, Any], timeout: float | None = None):
        """Call ``method`` on the leader; fires with its result, fails at once
        with a non-retryable error (VersionMismatch, BadRequest...), or fails
        with Timeout (naming the last error seen) once the deadline passes."""
        total = self.timeout if timeout is None else timeout
        deadline = self.reactor.seconds() + total
        backoff = Backoff(rng=self.rng)
        last_error: errors.SurfShardError | None = None
        # Bounded: every iteration either returns, raises, or waits at least
        # a backoff step, and the deadline ends the loop.
        while True:
            remaining = deadline - self.reactor.seconds()
            if remaining <= 0:
                # The group as a whole did not answer in time: that is a
                # Timeout, whichever replica happened to be tried last (its
                # own error, e.g. one node's Unavailable, is only a detail).
                detail = f" (last error: {last_error})" if last_error is not None else ""
                raise errors.Timeout(
                    f"{method}: no leader answered within {total:.1f}s{detail}"
                ) from last_error
            address = self._guess()
            per_attempt = min(self.attempt_timeout, remaining)
            call_args = dict(args)
            # Let the server wait (for a leader or a commit) almost as long
            # as we do, so a majority outage blocks rather than fails fast.
            call_args.setdefault("timeout", max(0.0, per_attempt - 0.05))
            try:
                result = yield self.pool.call(address, method, call_args, timeout=per_attempt)
            except errors.NotLeader as e:
                last_error = e
                hint = e.leader
                if hint and hint != address and hint in self.addresses:
                    self.leader = hint
                    continue
                self._rotate(address)
            except RETRYABLE as e:
                last_error = e
                self._rotate(address)
            else:
                self.leader = address
                return result
            delay = min(backoff.next_delay(), max(0.0, deadline - self.reactor.seconds()))
            yield _sleep(self.reactor, delay)


def _sleep(reactor: IReactorTime, seconds: float) -> defer.Deferred:
    d: defer.Deferred = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d
