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
from twisted.python.failure import Failure

from surfshard import errors
from surfshard.config import parse_address
from surfshard.net.interfaces import IPipelinedPool, IRpcPool

#: Errors after which the same call may go to another replica. A write is
#: safe to resend because it carries (client id, sequence number).
RETRYABLE = (
    errors.NotLeader,
    errors.Crashed,
    errors.Timeout,
    errors.Unavailable,
    errors.NotReady,
    errors.Busy,
)

#: Most addresses a caller that learns members holds: the replicas a group
#: may have (``membership.MAX_MEMBERS``) and as many again.
MAX_LEARNED_ADDRESSES = 30


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

    ``pool`` is a ``surfshard.net.pool.RpcClientPool`` (anything with
    ``call(address, method, args, timeout) -> Deferred``). The leader guess
    follows NOT_LEADER hints at once; other failures rotate through the
    addresses after a backoff, until the call's overall deadline.
    """

    log = Logger()

    def __init__(
        self,
        pool: IRpcPool,
        addresses: Sequence[str],
        reactor: IReactorTime,
        *,
        timeout: float = 30.0,
        attempt_timeout: float = 2.0,
        rng: random.Random | None = None,
        learn_members: bool = False,
    ) -> None:
        if not addresses:
            raise ValueError("a replica group needs at least one address")
        #: Follow a NOT_LEADER hint to an address not in ``addresses`` (and
        #: keep it among them): for a group whose callers know only where it
        #: started (the ShardMaster, from the config) while membership
        #: changes move it on. Off where the addresses come from a list that
        #: follows the membership (a metadata group's, from the shard map).
        self.learn_members = learn_members
        #: How many of ``addresses`` were given (the rest were learnt).
        self._given = len(addresses)
        self.pool = pool
        #: The pool again if it answers into a sink (``call_into``), else
        #: None: asked once, not on every call.
        self._pipelined: IPipelinedPool | None = pool if IPipelinedPool.providedBy(pool) else None
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

    def call(self, method: str, args: dict[str, Any], timeout: float | None = None) -> defer.Deferred[Any]:
        """Call ``method`` on the leader; fires with its result, fails at once
        with a non-retryable error (VersionMismatch, BadRequest...), or fails
        with Timeout (naming the last error seen) once the deadline passes."""
        total = self.timeout if timeout is None else timeout
        deadline = self.reactor.seconds() + total
        if total <= 0:
            return defer.fail(errors.Timeout(f"{method}: no leader answered within {total:.1f}s"))
        # The first attempt is plain callbacks, not a generator (and, on an
        # established connection, not even a Deferred of its own: the
        # connection answers ``_FirstAttempt`` directly): it is the only
        # attempt almost every call makes, and a client's CPU per call is on
        # the path of every request it pipelines.
        address = self._guess()
        first = _FirstAttempt(self, address, method, args, deadline, total)
        result = first.result
        per_attempt = min(self.attempt_timeout, total)
        call_args = self._call_args(args, per_attempt)
        try:
            pipelined = self._pipelined
            sent = (
                pipelined.call_into(address, first, method, call_args, per_attempt)
                if pipelined is not None
                else None
            )
        except errors.Unavailable:  # the peer is not taking more: the slow path retries
            sent = None
        except errors.SurfShardError as e:  # cannot be encoded: nothing was sent
            return defer.fail(e)
        if sent is not None:
            first.connection, first.call_id = sent
        else:
            first.inner = self.pool.call(address, method, call_args, timeout=per_attempt)
            first.inner.addCallbacks(first.callback, first.errback)
        return result

    @staticmethod
    def _call_args(args: dict[str, Any], per_attempt: float) -> dict[str, Any]:
        call_args = dict(args)
        # Let the server wait (for a leader or a commit) almost as long as we
        # do, so a majority outage blocks rather than fails fast.
        call_args.setdefault("timeout", max(0.0, per_attempt - 0.05))
        return call_args

    def _attempt(
        self, address: str, method: str, args: dict[str, Any], remaining: float
    ) -> defer.Deferred[Any]:
        per_attempt = min(self.attempt_timeout, remaining)
        return self.pool.call(address, method, self._call_args(args, per_attempt), timeout=per_attempt)

    def _failed_over(self, address: str, error: errors.SurfShardError) -> bool:
        """Update the leader guess after ``address`` failed with a retryable
        ``error``; True if a hint names another replica to try at once."""
        if isinstance(error, errors.NotLeader):
            hint = error.leader
            if hint and hint != address and (hint in self.addresses or self._learn(hint)):
                self.leader = hint
                return True
        self._rotate(address)
        return False

    def _learn(self, address: str) -> bool:
        """Take ``address`` (named leader by a member) among the addresses,
        if this caller learns members. Bounded: past MAX_LEARNED_ADDRESSES
        the oldest learnt address makes room (the ones it was given stay),
        so a group replaced many times over cannot grow the list without end."""
        if not self.learn_members:
            return False
        try:
            parse_address(address)
        except ValueError:
            return False
        if len(self.addresses) >= MAX_LEARNED_ADDRESSES:
            if len(self.addresses) <= self._given:
                return False
            del self.addresses[self._given]
        self.addresses.append(address)
        self.log.info("{address} is named leader: added to the replicas this caller tries", address=address)
        return True

    @defer.inlineCallbacks
    def _retry(
        self,
        method: str,
        args: dict[str, Any],
        deadline: float,
        total: float,
        last_error: errors.SurfShardError,
        at_once: bool,
    ):
        """The attempts after a retryable failure: follow hints at once,
        otherwise back off (capped, jittered) and rotate, until the deadline."""
        backoff = Backoff(rng=self.rng)
        # Bounded: every iteration either returns, raises, or waits at least
        # a backoff step, and the deadline ends the loop.
        while True:
            if not at_once:
                delay = min(backoff.next_delay(), max(0.0, deadline - self.reactor.seconds()))
                yield _sleep(self.reactor, delay)
            remaining = deadline - self.reactor.seconds()
            if remaining <= 0:
                # The group as a whole did not answer in time: that is a
                # Timeout, whichever replica happened to be tried last (its
                # own error, e.g. one node's Unavailable, is only a detail).
                raise errors.Timeout(
                    f"{method}: no leader answered within {total:.1f}s (last error: {last_error})"
                ) from last_error
            address = self._guess()
            try:
                result = yield self._attempt(address, method, args, remaining)
            except RETRYABLE as e:
                last_error = e
                at_once = self._failed_over(address, e)
            else:
                self.leader = address
                return result


class _FirstAttempt:
    """The first attempt of ``LeaderCaller.call``: the sink its reply goes
    to (``RpcConnection.call_into``), which answers the caller's Deferred or
    hands over to the retry loop."""

    __slots__ = (
        "address",
        "args",
        "call_id",
        "caller",
        "connection",
        "deadline",
        "inner",
        "method",
        "result",
        "retry",
        "total",
    )

    def __init__(
        self,
        caller: LeaderCaller,
        address: str,
        method: str,
        args: dict[str, Any],
        deadline: float,
        total: float,
    ) -> None:
        self.caller = caller
        #: What the caller of ``LeaderCaller.call`` waits on; cancelling it
        #: cancels the attempt (or the retries) in flight.
        self.result: defer.Deferred[Any] = defer.Deferred(self.cancel)
        self.address = address
        self.method = method
        self.args = args
        self.deadline = deadline
        self.total = total
        self.connection: Any = None
        self.call_id = 0
        self.inner: defer.Deferred[Any] | None = None
        self.retry: defer.Deferred[Any] | None = None

    @property
    def called(self) -> bool:
        return self.result.called

    def callback(self, value: Any) -> None:
        if not self.result.called:  # else cancelled meanwhile
            self.caller.leader = self.address
            self.result.callback(value)

    def errback(self, error: BaseException | Failure) -> None:
        if self.result.called:
            return  # cancelled meanwhile
        exception = error.value if isinstance(error, Failure) else error
        if not isinstance(exception, RETRYABLE):
            self.result.errback(error)
            return
        caller = self.caller
        at_once = caller._failed_over(self.address, exception)
        self.retry = caller._retry(self.method, self.args, self.deadline, self.total, exception, at_once)
        self.retry.chainDeferred(self.result)

    def cancel(self, _result: object = None) -> None:
        if self.retry is not None:
            self.retry.cancel()
        elif self.inner is not None:
            self.inner.cancel()
        elif self.connection is not None:
            self.connection.forget(self.call_id)


def _sleep(reactor: IReactorTime, seconds: float) -> defer.Deferred:
    d: defer.Deferred = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d
