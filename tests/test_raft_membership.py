"""Membership change in the Raft core (thesis chapter 4): learners, one
server at a time, a leader removing itself, membership in snapshots and
across restarts, and a randomized schedule of changes under crashes,
partitions and message loss with the safety invariants checked after every
step.

Driven message by message with ``tests.test_raft_core``'s router. The
randomized test takes ``RAFT_MEMBERSHIP_SEED`` (replay one seed) or runs
``RAFT_MEMBERSHIP_SEEDS`` seeds (default 16); a failing seed is printed.
"""

from __future__ import annotations

import os
import random

from twisted.trial.unittest import SynchronousTestCase

from raft.errors import NotLeaderError
from raft.types import (
    Entry,
    EntryKind,
    Membership,
    Message,
    MessageType,
    RaftConfig,
    Role,
    entries_from_columns,
    entries_to_columns,
    kinds_column,
)
from tests.test_raft_core import Harness, Network

BOOT = (1, 2, 3)


class MemberNetwork(Network):
    """``Network`` with servers that are not members yet."""

    def grow(self, *new_ids: int, **config: object) -> None:
        """Add servers started with the same bootstrap as the others, as a
        joining server is."""
        for i in new_ids:
            self.nodes[i] = Harness(i, RaftConfig(i, BOOT, **config), self.inv, 0)  # type: ignore[arg-type]
        self.ids = tuple(sorted((*self.ids, *new_ids)))

    def wait_members_leader(self, max_ticks: int = 300) -> int:
        """A leader that every voter of its membership follows."""
        for _ in range(max_ticks):
            self.tick()
            leaders = self.leaders()
            if leaders:
                top = max(leaders, key=lambda i: self.core(i).term)
                if all(self.core(j).leader == top for j in self.core(top).voters if j != top):
                    return top
        raise AssertionError("no leader elected")


def change(net: Network, new: Membership) -> int:
    leader = net.leader()
    index, _ = net.core(leader).propose_membership(new)
    net.settle()
    return index


def committed_everywhere(net: Network, index: int, ids: tuple[int, ...]) -> bool:
    return all(net.core(i).commit_index >= index for i in ids)


class EntryKindWireTests(SynchronousTestCase):
    def test_kinds_column_round_trip(self) -> None:
        m = Membership((1, 2), (3,), ((3, "h:1"),))
        entries = [Entry(2, 5, b"a"), Entry(2, 6, m.encode(), EntryKind.MEMBERSHIP), Entry(3, 7, None)]
        terms, datas = entries_to_columns(entries)
        kinds = kinds_column(entries)
        self.assertEqual(kinds, [1, 1])
        self.assertEqual(entries_from_columns(5, terms, datas, kinds), entries)
        self.assertIsNone(kinds_column([Entry(1, 1, b"x")]))

    def test_bad_kinds_refused(self) -> None:
        terms, datas = entries_to_columns([Entry(1, 1, b"x")])
        for bad in ([0, 9], [5, 1], [0], "x", [0, True]):
            with self.assertRaises(ValueError, msg=repr(bad)):
                entries_from_columns(1, terms, datas, bad)

    def test_message_carries_kinds(self) -> None:
        m = Membership((1, 2, 3), (4,), ((4, "127.0.0.1:1"),))
        msg = Message(
            MessageType.APPEND,
            to=2,
            frm=1,
            term=3,
            index=9,
            log_term=3,
            entries=[Entry(3, 10, m.encode(), EntryKind.MEMBERSHIP)],
        )
        back = Message.from_wire(msg.to_wire())
        self.assertEqual(back, msg)
        self.assertEqual(Membership.decode(back.entries[0].data), m)

    def test_membership_rules(self) -> None:
        m = Membership((1, 2, 3))
        self.assertEqual(m.max_id, 3)
        grown = m.with_learner(4, "a:1")
        self.assertEqual((grown.voters, grown.learners, grown.address_of(4)), ((1, 2, 3), (4,), "a:1"))
        self.assertEqual(grown.promoted(4).voters, (1, 2, 3, 4))
        shrunk = grown.promoted(4).without(2)
        self.assertEqual((shrunk.voters, shrunk.max_id), ((1, 3, 4), 4))
        with self.assertRaises(ValueError):
            m.with_learner(2, "a:1")
        with self.assertRaises(ValueError):
            m.promoted(2)
        with self.assertRaises(ValueError):
            Membership((1, 2), (2,))
        with self.assertRaises(ValueError):
            Membership.decode(b"\xff")


class LearnerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.net = MemberNetwork(3, seed=7)
        self.net.grow(4)
        self.net.elect(1)
        self.net.settle()
        self.m0 = self.net.core(1).membership

    def test_learner_catches_up_but_does_not_count(self) -> None:
        net = self.net
        index = change(net, self.m0.with_learner(4, "h:4"))
        self.assertTrue(committed_everywhere(net, index, (1, 2, 3, 4)))
        self.assertEqual(net.core(4).membership.learners, (4,))
        # With two of three voters gone, the learner's ack commits nothing.
        net.down |= {2, 3}
        idx, _ = net.core(1).propose(b"x")
        net.settle()
        self.assertEqual(net.core(4).last_index, idx)
        self.assertLess(net.core(1).commit_index, idx)

    def test_learner_never_campaigns(self) -> None:
        net = self.net
        change(net, self.m0.with_learner(4, "h:4"))
        term = net.core(4).term
        net.isolate(4)
        net.tick(40, nodes=[4])
        self.assertEqual((net.core(4).role, net.core(4).term), (Role.FOLLOWER, term))
        net.core(4).campaign()
        net.stabilize()
        self.assertEqual(net.core(4).role, Role.FOLLOWER)

    def test_promoted_learner_counts_and_votes(self) -> None:
        net = self.net
        change(net, self.m0.with_learner(4, "h:4"))
        index = change(net, net.core(1).membership.promoted(4))
        net.settle()
        self.assertTrue(committed_everywhere(net, index, (1, 2, 3, 4)))
        self.assertEqual(net.core(2).voters, frozenset((1, 2, 3, 4)))
        # Four voters: a quorum is three. With 3 and 4 down nothing commits.
        net.down |= {3, 4}
        idx, _ = net.core(1).propose(b"y")
        net.settle()
        self.assertLess(net.core(1).commit_index, idx)
        net.down.discard(4)
        net.settle()
        net.tick(3)
        self.assertGreaterEqual(net.core(1).commit_index, idx)
        # ...and node 4 can now be elected.
        net.down.discard(3)
        net.settle()
        net.core(1).transfer_leader(4)
        net.stabilize()
        self.assertEqual(net.leader(), 4)


class ChangeRulesTests(SynchronousTestCase):
    def test_one_change_at_a_time(self) -> None:
        net = MemberNetwork(3, seed=8)
        net.grow(4, 5)
        net.elect(1)
        net.settle()
        core = net.core(1)
        m = core.membership
        net.down |= {2, 3}  # the first change cannot commit
        core.propose_membership(m.with_learner(4, "h:4"))
        net.stabilize()
        self.assertTrue(core.membership_pending)
        with self.assertRaises(ValueError):
            core.propose_membership(core.membership.with_learner(5, "h:5"))

    def test_two_voters_at_once_refused(self) -> None:
        net = Network(3, seed=9)
        net.elect(1)
        net.settle()
        with self.assertRaises(ValueError):
            net.core(1).propose_membership(Membership((1,)))
        with self.assertRaises(ValueError):
            net.core(1).propose_membership(Membership((), (1, 2, 3)))
        with self.assertRaises(NotLeaderError):
            net.core(2).propose_membership(Membership((1, 2)))

    def test_refused_before_the_leader_commits_in_its_term(self) -> None:
        net = MemberNetwork(3, seed=10)
        net.elect(1)
        net.settle()
        net.isolate(1)
        # A new leader whose no-op cannot commit: every append answer is lost.
        net.filters.append(lambda m: m.type == MessageType.APPEND_RESP)
        net.tick(30, nodes=[2, 3])
        leader = next(i for i in (2, 3) if net.core(i).role == Role.LEADER)
        core = net.core(leader)
        with self.assertRaises(ValueError):
            core.propose_membership(core.membership.without(1))
        net.filters.clear()
        net.tick(3, nodes=[2, 3])
        index, _ = core.propose_membership(core.membership.without(1))
        net.settle()
        self.assertTrue(committed_everywhere(net, index, (2, 3)))


class RemovalTests(SynchronousTestCase):
    def test_removed_follower_is_cut_off_and_harmless(self) -> None:
        net = Network(3, seed=11)
        net.elect(1)
        net.settle()
        index = change(net, net.core(1).membership.without(3))
        net.settle()
        # Node 3 has the change in its log (in force there), though nobody
        # tells it the commit: the leader no longer replicates to it.
        self.assertTrue(committed_everywhere(net, index, (1, 2)))
        self.assertGreaterEqual(net.core(3).last_index, index)
        self.assertEqual(net.core(3).voters, frozenset((1, 2)))
        # Node 3 knows it is out: it never campaigns, however long it waits.
        term = net.core(1).term
        net.tick(50, nodes=[3])
        self.assertEqual(net.core(3).role, Role.FOLLOWER)
        # Two voters commit with both up, not with one.
        net.down.add(2)
        idx, _ = net.core(1).propose(b"z")
        net.settle()
        self.assertLess(net.core(1).commit_index, idx)
        self.assertEqual(net.core(1).term, term)

    def test_removed_follower_that_missed_the_change_does_not_disrupt(self) -> None:
        net = Network(3, seed=12)
        net.elect(1)
        net.settle()
        net.isolate(3)
        change(net, net.core(1).membership.without(3))
        term = net.core(1).term
        net.tick(30, nodes=[3])  # it campaigns (pre-vote) into the void
        net.heal()
        for _ in range(40):
            net.tick()
        self.assertEqual((net.leader(), net.core(1).term), (1, term))

    def test_leader_removing_itself_steps_down_after_commit(self) -> None:
        net = MemberNetwork(3, seed=13)
        net.elect(1)
        net.settle()
        index, _ = net.core(1).propose_membership(net.core(1).membership.without(1))
        # It keeps leading (without counting itself) until the change commits.
        self.assertEqual(net.core(1).role, Role.LEADER)
        net.settle()
        self.assertGreaterEqual(net.core(2).commit_index, index)
        self.assertEqual(net.core(1).role, Role.FOLLOWER)
        leader = net.wait_members_leader()
        self.assertIn(leader, (2, 3))
        idx, _ = net.core(leader).propose(b"after")
        net.settle()
        self.assertTrue(committed_everywhere(net, idx, (2, 3)))
        net.tick(50, nodes=[1])
        self.assertNotEqual(net.core(1).role, Role.LEADER)


class TruncationTests(SynchronousTestCase):
    def test_uncommitted_change_truncated_away_reverts_membership(self) -> None:
        net = MemberNetwork(3, seed=14)
        net.grow(4)
        net.elect(1)
        net.settle()
        m0 = net.core(1).membership
        # Leader 1 appends a change that no one else receives...
        net.isolate(1)
        net.core(1).propose_membership(m0.with_learner(4, "h:4"))
        net.stabilize()
        self.assertEqual(net.core(1).membership.learners, (4,))
        # ...the others elect a leader that writes over that index...
        net.tick(30, nodes=[2, 3])
        leader = net.leader()
        self.assertIn(leader, (2, 3))
        net.core(leader).propose(b"overwrite")
        net.settle()
        # ...and once node 1 hears from it, the change is gone there too.
        net.heal()
        net.tick(6)
        self.assertEqual(net.core(1).leader, leader)
        self.assertEqual(net.core(1).membership, m0)
        self.assertEqual(net.core(1).peers, (1, 2, 3))


class SnapshotAndRestartTests(SynchronousTestCase):
    def test_learner_catches_up_by_snapshot_and_keeps_membership_on_restart(self) -> None:
        net = MemberNetwork(3, seed=15)
        net.grow(4)
        net.elect(1)
        net.settle()
        for k in range(20):
            net.core(1).propose(b"w%d" % k)
        net.settle()
        for i in (1, 2, 3):
            net.nodes[i].compact()
        net.isolate(4)
        change(net, net.core(1).membership.with_learner(4, "h:4"))
        net.nodes[1].compact()  # the change itself is in the snapshot now
        net.heal()
        net.tick(4)
        h4 = net.nodes[4]
        self.assertTrue(h4.snapshots_received)
        self.assertEqual(h4.snapshots_received[-1].meta.learners, (4,))
        self.assertEqual(h4.core.membership.address_of(4), "h:4")
        self.assertEqual(h4.core.commit_index, net.core(1).commit_index)
        net.restart(4)
        self.assertEqual(net.core(4).membership.learners, (4,))
        index = change(net, net.core(1).membership.promoted(4))
        net.restart(2)
        net.settle()
        self.assertEqual(net.core(2).voters, frozenset((1, 2, 3, 4)))
        self.assertTrue(committed_everywhere(net, index, (1, 2, 3, 4)))


def _seeds() -> list[int]:
    env = os.environ.get("RAFT_MEMBERSHIP_SEED", "").strip()
    if env:
        return [int(env)]
    return list(range(1, 1 + int(os.environ.get("RAFT_MEMBERSHIP_SEEDS", "").strip() or 16)))


POOL = (1, 2, 3, 4, 5, 6, 7, 8)


def random_membership_change(rnd: random.Random, m: Membership) -> Membership | None:
    fresh = [i for i in POOL if i > m.max_id]
    options: list[Membership] = []
    if fresh:
        options.append(m.with_learner(fresh[0], f"h:{fresh[0]}"))
    options.extend(m.promoted(i) for i in m.learners)
    options.extend(m.without(i) for i in m.learners)
    if len(m.voters) > 1:
        options.extend(m.without(i) for i in m.voters)
    return rnd.choice(options) if options else None


def run_membership_schedule(seed: int, steps: int = 3000) -> tuple[MemberNetwork, int]:
    """Random changes of membership on leaders, with message loss,
    reordering, partitions, crashes and compactions; ``Network.check``
    (one leader per term, log matching, committed entries never change,
    leader completeness) after every step. Ends by healing everything and
    checking that the final voters commit a last entry."""
    rnd = random.Random(seed)
    inflight, chunk = rnd.choice((1, 8)), rnd.choice((7, 999))
    net = MemberNetwork(3, seed=seed, max_inflight_msgs=inflight, snapshot_chunk_bytes=chunk)
    net.grow(*POOL[3:], max_inflight_msgs=inflight, snapshot_chunk_bytes=chunk)
    pending: list[Message] = []
    changes = 0
    for step in range(steps):
        action = rnd.choices(
            ("deliver", "tick", "propose", "member", "part", "heal", "crash", "compact"),
            (55, 20, 10, 4, 1.5, 2, 2, 2),
        )[0]
        if action == "deliver" and pending:
            m = pending.pop(0 if rnd.random() < 0.7 else rnd.randrange(len(pending)))
            if rnd.random() >= 0.08:
                net.deliver(m)
        elif action == "tick":
            i = rnd.choice(net.ids)
            if i not in net.down:
                net.core(i).tick()
        elif action in ("propose", "member"):
            leaders = net.leaders()
            if leaders:
                core = net.core(rnd.choice(leaders))
                try:
                    if action == "propose":
                        core.propose(b"v%d" % step)
                    else:
                        new = random_membership_change(rnd, core.membership)
                        if new is not None:
                            core.propose_membership(new)
                            changes += 1
                except (NotLeaderError, ValueError):
                    pass
        elif action == "part":
            ids = list(net.ids)
            rnd.shuffle(ids)
            k = rnd.randrange(1, len(ids))
            net.partition(ids[:k], ids[k:])
        elif action == "heal":
            net.heal()
        elif action == "crash":
            i = rnd.choice(net.ids)
            if i in net.down:
                net.restart(i)
            elif len(net.down) < 2:
                net.down.add(i)
        elif action == "compact":
            h = net.nodes[rnd.choice(net.ids)]
            if h.id not in net.down and h.sm.index > h.core.snapshot_meta.index:
                h.compact()
        for i in net.ids:
            if i not in net.down:
                pending.extend(net.nodes[i].process())
        if len(pending) > 300:
            del pending[: len(pending) - 300]
        net.check()
    for i in list(net.down):
        net.restart(i)
    net.heal()
    for _ in range(50):
        leader = net.wait_members_leader()
        try:
            idx, _ = net.core(leader).propose(b"final")
            break
        except NotLeaderError:
            net.tick()
    else:
        raise AssertionError("no leader accepted the final proposal")
    voters = sorted(net.core(leader).voters)
    for _ in range(100):
        net.tick()
        if all(net.core(i).commit_index >= idx for i in voters):
            return net, changes
    raise AssertionError(f"final entry {idx} not committed on voters {voters}")


class RandomizedMembershipTests(SynchronousTestCase):
    def test_random_changes_keep_safety(self) -> None:
        changed = 0
        for seed in _seeds():
            try:
                net, _proposed = run_membership_schedule(seed)
            except AssertionError as e:
                raise AssertionError(f"seed {seed} (replay with RAFT_MEMBERSHIP_SEED={seed}): {e}") from e
            # The schedules must change membership, not only try to.
            newest = max((net.core(i) for i in net.ids), key=lambda c: c.commit_index)
            if newest.membership != Membership(BOOT):
                changed += 1
        self.assertGreater(changed, len(_seeds()) // 2)
