"""What every Raft-replicated SurfShard service answers, whatever its state
machine: ``ReplicaControl`` holds the calls every replica serves (status,
leadership, the ChaosMonkey switch) and the helper that runs a call on the
leader, waiting out elections within a timeout. The process assembly is in
``surfshard.replica.service``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from raft.errors import NodeCrashed, NotLeaderError, ProposalDropped, RaftTimeout, ReadAborted
from raft.node import RaftNode
from surfshard import errors
from surfshard.net.methods import Access, MethodTable
from surfshard.net.schema import Arg

#: How long a call waits for a leader or a commit when the caller gives no timeout.
DEFAULT_CALL_TIMEOUT = 30.0
#: Upper bound on a caller-supplied timeout, so no request can pin server
#: resources for longer than this.
MAX_CALL_TIMEOUT = 300.0

#: The optional ``timeout`` every leader-bound native call accepts: how long
#: the server may wait for a leader or a majority before answering TIMEOUT.
TIMEOUT_ARG = Arg("timeout", float, required=False, min=0.0, max=MAX_CALL_TIMEOUT)


def sleep(reactor: IReactorTime, seconds: float) -> defer.Deferred:
    """A Deferred that fires after ``seconds`` on ``reactor``; cancelling it
    cancels the timer."""
    call = None

    def cancel(_: defer.Deferred) -> None:
        if call is not None and call.active():
            call.cancel()

    d: defer.Deferred = defer.Deferred(cancel)
    call = reactor.callLater(seconds, d.callback, None)
    return d


class ReplicaControl:
    """The calls every replica answers, over a ``RaftNode``.

    ``addresses`` maps Raft ids to the ``host:port`` clients use, so errors
    can name the leader. ``transfer(leader_id, to_id)`` asks the leader to
    hand over leadership (an RPC, wired by the service).
    """

    log = Logger()

    def __init__(
        self,
        node: RaftNode,
        addresses: Mapping[int, str],
        reactor: IReactorTime,
        *,
        chaos: bool = False,
        poll_interval: float = 0.02,
        transfer: Callable[[int, int], defer.Deferred] | None = None,
    ) -> None:
        self.node = node
        self.addresses = dict(addresses)
        self.reactor = reactor
        self.chaos = chaos
        self.poll_interval = poll_interval
        self._transfer = transfer
        #: ``wait_until`` calls not answered yet: (ready, Deferred).
        self._apply_waiters: list[tuple[Callable[[], bool], defer.Deferred]] = []
        self._observing_applies = False

    # -- helpers for subclasses -------------------------------------------

    def wait_until(self, ready: Callable[[], bool], seconds: float) -> defer.Deferred:
        """Fires (with None) once ``ready()`` holds after an entry is applied
        here, this node's role changes, or ``seconds`` pass: what a long
        poll waits on between its two reads."""
        d: defer.Deferred = defer.Deferred()
        call = self.reactor.callLater(seconds, lambda: None if d.called else d.callback(None))
        waiter = (ready, d)
        self._apply_waiters.append(waiter)

        def done(result: Any) -> Any:
            if call.active():
                call.cancel()
            if waiter in self._apply_waiters:
                self._apply_waiters.remove(waiter)
            return result

        d.addBoth(done)
        if not self._observing_applies:
            self._observing_applies = True
            self.node.on_apply.append(lambda _entry, _result: self._wake_waiters(every=False))
            self.node.on_role_change.append(lambda _role, _leader: self._wake_waiters(every=True))
        return d

    def _wake_waiters(self, every: bool) -> None:
        if not self._apply_waiters:
            return  # the common case, on every applied entry
        for ready, d in list(self._apply_waiters):
            if (every or ready()) and not d.called:
                d.callback(None)

    def leader_address(self) -> str | None:
        leader = self.node.leader_id
        return self.addresses.get(leader) if leader is not None else None

    def not_leader(self) -> errors.NotLeader:
        return errors.NotLeader("this node is not the leader", leader=self.leader_address())

    def check_alive(self) -> None:
        if self.node.crashed:
            raise errors.Crashed("node is crashed")

    @staticmethod
    def clamp_timeout(timeout: float | None) -> float:
        if timeout is None:
            return DEFAULT_CALL_TIMEOUT
        return max(0.0, min(float(timeout), MAX_CALL_TIMEOUT))

    def as_leader(
        self,
        attempt: Callable[[float], defer.Deferred],
        timeout: float | None,
        then: Callable[[Any], Any] | None = None,
    ) -> defer.Deferred:
        """Run ``attempt(remaining_seconds)`` on this node while it leads;
        the result is ``then(attempt's result)`` if ``then`` is given.

        While no leader is known (an election, or a majority down) this
        waits, bounded by the deadline, rather than answering wrongly; after
        a lost leadership it tries again if this node leads again; once
        another node is known to lead it answers NOT_LEADER naming it.
        Re-running ``attempt`` must be safe: writes carry a client id and
        sequence number so the state machine answers a repeat from its
        dedup table.
        """
        seconds = self.reactor.seconds
        now = seconds()
        deadline = now + self.clamp_timeout(timeout)
        node = self.node
        if not (node.is_leader and not node.crashed and deadline > now):
            d = self._as_leader_loop(attempt, deadline)
            return d if then is None else d.addCallback(then)
        # The common case, a leader answering: run the attempt at once and
        # only go through the waiting loop if it fails in a way that calls
        # for another look. Every write and read takes this path, so it adds
        # one callback pair to the attempt's Deferred (``then`` and the
        # failure mapping side by side), no generator and no Deferred of
        # its own.
        try:
            d = attempt(deadline - seconds())
        except Exception:
            return defer.fail()
        if not isinstance(d, defer.Deferred):
            # As the loop's ``yield`` accepts a plain value.
            return defer.succeed(d) if then is None else defer.maybeDeferred(then, d)
        if then is None:
            return d.addErrback(self._attempt_failed, attempt, deadline, None)
        return d.addCallbacks(then, self._attempt_failed, errbackArgs=(attempt, deadline, then))

    def _attempt_failed(
        self,
        failure: Failure,
        attempt: Callable[[float], defer.Deferred],
        deadline: float,
        then: Callable[[Any], Any] | None,
    ) -> Any:
        if failure.check(ProposalDropped, ReadAborted, NotLeaderError):
            # Leadership changed under us: look again after a pause, as the loop does.
            d = sleep(self.reactor, min(self.poll_interval, max(deadline - self.reactor.seconds(), 0.0)))
            d.addCallback(lambda _: self._as_leader_loop(attempt, deadline))
            return d if then is None else d.addCallback(then)
        if failure.check(RaftTimeout):
            raise errors.Timeout("no answer from a majority within the timeout") from failure.value
        if failure.check(NodeCrashed):
            raise errors.Crashed("node is crashed") from failure.value
        return failure

    @defer.inlineCallbacks
    def _as_leader_loop(self, attempt: Callable[[float], defer.Deferred], deadline: float):
        """``as_leader`` when the first look does not find this node leading
        (or its attempt lost the leadership): poll until the deadline."""
        while True:
            self.check_alive()
            remaining = deadline - self.reactor.seconds()
            if remaining <= 0:
                raise errors.Timeout("no answer from a majority within the timeout")
            if self.node.is_leader:
                try:
                    result = yield attempt(remaining)
                except (ProposalDropped, ReadAborted, NotLeaderError):
                    pass  # leadership changed under us: look again
                except RaftTimeout as e:
                    raise errors.Timeout("no answer from a majority within the timeout") from e
                except NodeCrashed as e:
                    raise errors.Crashed("node is crashed") from e
                else:
                    return result
            elif self.node.leader_id is not None:
                raise self.not_leader()
            yield sleep(self.reactor, min(self.poll_interval, max(remaining, 0.0)))

    # -- calls ------------------------------------------------------------

    def is_leader(self) -> bool:
        # A crashed node does not act as leader, whatever its frozen role.
        return self.node.is_leader and not self.node.crashed

    def is_crashed(self) -> bool:
        return bool(self.node.crashed)

    def status(self) -> dict[str, Any]:
        status = dict(self.node.status())
        status["leader_address"] = self.leader_address()
        status["chaos"] = self.chaos
        return plain(status)

    def _check_chaos(self, what: str) -> None:
        if not self.chaos:
            self.log.warn("refused {what}: chaos calls are disabled on this node", what=what)
            raise errors.Forbidden(f"{what} refused: chaos calls are disabled on this node")

    def crash(self) -> bool:
        self._check_chaos("crash")
        self.node.crash()
        self.log.info("node crashed by request (simulated)")
        return True

    def restore(self) -> bool:
        self._check_chaos("restore")
        self.node.restore()
        self.log.info("node restored by request")
        return True

    def send_heartbeat(self) -> bool:
        self.check_alive()
        if not self.node.is_leader:
            raise self.not_leader()
        self.node.send_heartbeat()
        return True

    def transfer_leadership(self, to: int, timeout: float | None = None) -> bool:
        """Leader side of set_leader (and of ``surfshard admin member lead``):
        start a transfer to Raft node ``to``. (``timeout``: what a caller
        through ``LeaderCaller`` sends; the start does not wait.)"""
        self.check_alive()
        if to not in self.addresses:
            raise errors.BadRequest(f"unknown node id {to}")
        if not self.node.is_leader:
            raise self.not_leader()
        if to != self.node.node_id:
            try:
                self.node.transfer_leader(to)
            except ValueError as e:  # a learner, or removed meanwhile
                raise errors.BadRequest(str(e)) from None
        return True

    @defer.inlineCallbacks
    def set_leader(self, timeout: float | None = None):
        """Make this node the leader (SurfStore ``SetLeader``): ask the
        current leader to transfer to us, then wait until we lead."""
        self._check_chaos("set_leader")
        self.check_alive()
        deadline = self.reactor.seconds() + self.clamp_timeout(timeout)
        asked_at = float("-inf")
        # Bounded by the deadline; the leader is asked again every second in
        # case a transfer was aborted (e.g. we were briefly unreachable).
        while not self.node.is_leader:
            self.check_alive()
            now = self.reactor.seconds()
            if now >= deadline:
                raise errors.Timeout("leadership transfer did not complete within the timeout")
            leader = self.node.leader_id
            if leader is not None and now - asked_at >= 1.0 and self._transfer is not None:
                asked_at = now
                try:
                    yield self._transfer(leader, self.node.node_id)
                except errors.SurfShardError as e:
                    self.log.info("transfer request to {leader} failed: {e}", leader=leader, e=e)
            yield sleep(self.reactor, self.poll_interval)
        return True

    def add_methods(self, table: MethodTable) -> None:
        """Register the common calls on a service's method table."""
        table.add("status", self.status)
        table.add("is_leader", self.is_leader)
        table.add("is_crashed", self.is_crashed)
        admin = (Access.ADMIN,)
        table.add("crash", self.crash, access=admin)
        table.add("restore", self.restore, access=admin)
        table.add("send_heartbeat", self.send_heartbeat, access=admin)
        table.add("set_leader", self.set_leader, [TIMEOUT_ARG], access=admin)
        # A replica asks its leader to hand over (set_leader on a follower).
        table.add(
            "transfer_leadership",
            self.transfer_leadership,
            [Arg("to", int, min=0, max=1 << 16), TIMEOUT_ARG],
            access=(Access.PEER, Access.ADMIN),
        )


def plain(value: Any) -> Any:
    """Status dicts go over CBOR, JSON and XML-RPC: keep to plain builtins."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(v) for v in value]
    if isinstance(value, str):
        return str(value)  # StrEnum members become plain str
    return value
