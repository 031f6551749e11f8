# -*- test-case-name: tests.test_membership -*-
"""Changing who is in a replica group while it runs (etcd's ``member
add/remove``; Raft thesis chapter 4), for any Raft-replicated service.

``GroupMembership`` serves three calls beside a replica's own:

- ``members``: the membership as this replica sees it (voters, learners,
  their addresses, whether a change is still uncommitted, and on the leader
  how far each member's log is).
- ``member_add(address)`` (admin): the leader adds a server at ``address``
  as a *learner* under a new id (never one used before). A learner gets the
  log, by snapshot if it is far behind, but neither votes nor counts toward
  a commit, so the group is no weaker while it catches up. The leader then
  makes it a voter by itself once it has caught up (``promote`` below).
- ``member_remove(node)`` (admin): the leader removes a voter or learner.
  Removing the leader hands leadership to the most caught-up other voter
  first; the caller is told NOT_LEADER with the new leader's address, and
  the new leader removes it.

Both are safe to retry: adding an address that is already a member answers
with that member, removing a non-member answers that it is gone. One change
is in flight at a time; another asked meanwhile gets BUSY (which callers
retry).

The address book (Raft id -> host:port) starts from the cluster config and
follows the membership as it changes, so the Raft transport reaches the new
members and not-leader answers name them. A server that is not yet in the
membership it knows of (one just added, starting with an empty log) asks
the group's known addresses for theirs until its own log names it: it has
to answer a leader it may never have heard of.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from raft.errors import NotLeaderError
from raft.types import Membership
from surfshard import errors
from surfshard.config import member_addresses, parse_address
from surfshard.net.interfaces import IRpcPool
from surfshard.net.methods import Access, MethodTable
from surfshard.net.schema import Arg
from surfshard.replica.control import TIMEOUT_ARG, ReplicaControl
from surfshard.replica.loops import polling_loop

#: How often the leader looks for learners ready to vote.
PROMOTE_INTERVAL = 0.25
#: How often a server not yet in its group asks the group for addresses.
SEED_INTERVAL = 1.0
#: Most members a group may have (voters and learners).
MAX_MEMBERS = 15


def describe_membership(m: Membership, book: dict[int, str]) -> dict[str, Any]:
    """A membership as plain data, with each member's address."""

    def entries(ids: tuple[int, ...]) -> list[dict[str, Any]]:
        return [{"id": i, "address": m.address_of(i) or book.get(i)} for i in ids]

    return {"voters": entries(m.voters), "learners": entries(m.learners), "max_id": m.max_id}


class GroupMembership(service.Service):
    """Membership calls and upkeep for the replica behind ``control``.

    ``on_addresses(book)`` is called with the whole address book whenever
    it changes (the service points its Raft transport at it). ``pool``
    reaches other replicas; ``seeds`` are the addresses to ask while this
    server is not yet in the membership it knows of.
    """

    log = Logger()

    def __init__(
        self,
        control: ReplicaControl,
        reactor: IReactorTime,
        *,
        on_addresses: Callable[[dict[int, str]], None] | None = None,
        pool: IRpcPool | None = None,
        seeds: tuple[str, ...] = (),
        promote_interval: float = PROMOTE_INTERVAL,
        seed_interval: float = SEED_INTERVAL,
    ) -> None:
        self.control = control
        self.node = control.node
        self.reactor = reactor
        self.on_addresses = on_addresses
        self.pool = pool
        self.seeds = seeds
        self.promote_interval = promote_interval
        self.seed_interval = seed_interval
        self._promote_loop: task.LoopingCall | None = None
        self._seed_loop: task.LoopingCall | None = None
        self._promoting = False
        #: Learners made voters by this replica while it led (for status and tests).
        self.promoted: list[int] = []
        self.node.on_membership_change.append(self._membership_changed)

    # -- lifecycle -----------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self.node.running:
            self._membership_changed(self.node.membership)
        self._promote_loop = polling_loop(
            self._promote, self.reactor, self.promote_interval, self.log, "learner promotion"
        )
        if self.pool is not None and self.seeds:
            self._seed_loop = polling_loop(
                self._seed, self.reactor, self.seed_interval, self.log, "membership seeding"
            )

    def stopService(self) -> None:
        for loop in (self._promote_loop, self._seed_loop):
            if loop is not None and loop.running:
                loop.stop()
        self._promote_loop = self._seed_loop = None
        return super().stopService()

    # -- the address book ----------------------------------------------------

    def _membership_changed(self, m: Membership) -> None:
        self._learn(dict(m.addresses), replace=True)

    def _learn(self, addresses: dict[int, str], *, replace: bool) -> None:
        """Put ``addresses`` in the book: all of them (from the membership,
        which is authoritative), or only ids the book lacks (hearsay from
        another replica while this one is not yet a member)."""
        book = self.control.addresses
        new = {i: a for i, a in addresses.items() if book.get(i) != a and (replace or i not in book)}
        if not new:
            return
        book.update(new)
        if not replace:
            self.log.info("learned the addresses of nodes {ids} from the group", ids=sorted(new))
        if self.on_addresses is not None:
            self.on_addresses(dict(book))

    @defer.inlineCallbacks
    def _seed(self):
        """While our own log does not make us a member, learn the members'
        addresses from whoever answers (see the module docstring)."""
        m = self.node.membership
        me = self.node.node_id
        # A member, or a server its log says was removed (an id at most
        # max_id that is not a member): nothing to learn.
        if me in m.members or me <= m.max_id or self.pool is None:
            if self._seed_loop is not None and self._seed_loop.running:
                self._seed_loop.stop()
            return
        for address in self.seeds:
            try:
                answer = yield self.pool.call(address, "members", {}, timeout=2.0)
            except errors.SurfShardError:
                continue
            self._learn(member_addresses(answer), replace=False)
            return

    def servers(self) -> tuple[str, ...] | None:
        """The members' addresses, voters first, once the membership has
        changed and the change is committed (None before: the config's list
        stands)."""
        core = self.node.core
        m = core.membership
        if not m.addresses or core.membership_pending:
            return None
        book = self.control.addresses
        return tuple(book[i] for i in (*m.voters, *m.learners) if i in book)

    # -- calls ---------------------------------------------------------------

    def members(self, timeout: float | None = None) -> dict[str, Any]:
        self.control.check_alive()
        node = self.node
        core = node.core
        out = describe_membership(core.membership, self.control.addresses)
        out["pending"] = core.membership_pending
        out["leader"] = node.leader_id
        out["leader_address"] = self.control.leader_address()
        if node.is_leader:
            out["match"] = {str(i): core.match_of(i) for i in core.membership.members}
            out["last_index"] = core.last_index
        return out

    def member_add(self, address: str, timeout: float | None = None) -> defer.Deferred:
        self.control.check_alive()
        try:
            parse_address(address)
        except ValueError as e:
            raise errors.BadRequest(f"bad member address: {e}") from None

        def attempt(remaining: float) -> defer.Deferred:
            m = self.node.membership
            for i in m.members:
                if (m.address_of(i) or self.control.addresses.get(i)) == address:
                    return defer.succeed(
                        {"id": i, "added": False, **describe_membership(m, self.control.addresses)}
                    )
            if len(m.members) >= MAX_MEMBERS:
                raise errors.BadRequest(f"a group has at most {MAX_MEMBERS} members")
            new_id = m.max_id + 1
            d = self._change(m.with_learner(new_id, address), remaining)
            return d.addCallback(
                lambda new: {"id": new_id, "added": True, **describe_membership(new, self.control.addresses)}
            )

        return self.control.as_leader(attempt, timeout)

    def member_remove(self, node: int, timeout: float | None = None) -> defer.Deferred:
        self.control.check_alive()

        def attempt(remaining: float) -> defer.Deferred:
            m = self.node.membership
            if node not in m.members:
                return defer.succeed(
                    {"id": node, "removed": False, **describe_membership(m, self.control.addresses)}
                )
            if m.voters == (node,):
                raise errors.BadRequest(f"node {node} is the group's only voter")
            if node == self.node.node_id and len(m.voters) > 1:
                self._hand_over()
                # as_leader waits for the new leader, then answers NOT_LEADER naming it.
                return defer.fail(NotLeaderError(None))
            d = self._change(m.without(node), remaining)
            return d.addCallback(
                lambda new: {"id": node, "removed": True, **describe_membership(new, self.control.addresses)}
            )

        return self.control.as_leader(attempt, timeout)

    def _hand_over(self) -> None:
        """Start a leadership transfer to the most caught-up other voter."""
        core = self.node.core
        others = [v for v in core.voters if v != self.node.node_id]
        to = max(others, key=lambda v: (core.match_of(v) or 0, -v))
        self.log.info("handing leadership to node {to} before removing this node", to=to)
        try:
            self.node.transfer_leader(to)
        except (ValueError, NotLeaderError) as e:
            self.log.info("leadership transfer to {to} not started: {e}", to=to, e=e)

    def _change(self, new: Membership, timeout: float) -> defer.Deferred:
        d = self.node.change_membership(new, timeout)

        def refused(failure: Any) -> Any:
            if failure.check(ValueError):
                # Another change in flight, or no commit yet in this term:
                # both pass by themselves; the caller retries.
                raise errors.Busy(f"membership change not possible now: {failure.value}") from None
            return failure

        return d.addErrback(refused)

    # -- upkeep --------------------------------------------------------------

    @defer.inlineCallbacks
    def _promote(self):
        """Leader: make a learner a voter once its log has caught up with
        the commit index (thesis 4.2.1; one at a time)."""
        node = self.node
        if self._promoting or not node.is_leader or node.crashed:
            return
        core = node.core
        if core.membership_pending:
            return
        for learner in core.membership.learners:
            match = core.match_of(learner)
            if match is None or match < core.commit_index:
                continue
            self._promoting = True
            try:
                yield node.change_membership(core.membership.promoted(learner), timeout=5.0)
            except Exception as e:  # lost leadership, timeout: the next round looks again
                self.log.info("promoting learner {id} failed: {e}", id=learner, e=e)
            else:
                self.promoted.append(learner)
                self.log.info("node {id} caught up and is now a voter", id=learner)
            finally:
                self._promoting = False
            return

    def add_methods(self, table: MethodTable) -> None:
        admin = (Access.ADMIN,)
        table.add("members", self.members, [TIMEOUT_ARG])
        table.add(
            "member_add", self.member_add, [Arg("address", str, max_len=300), TIMEOUT_ARG], access=admin
        )
        table.add(
            "member_remove",
            self.member_remove,
            [Arg("node", int, min=1, max=1 << 16), TIMEOUT_ARG],
            access=admin,
        )
