"""Tests of the I/O-free Raft core, driven message by message (the style of
etcd's raft_test.go): N cores, a tiny in-test router that delivers each
Ready's messages to the target core's ``step()`` (with drop/partition
filters), and ``advance()``.

Every node runs behind a ``Harness`` that persists Ready batches into an
in-memory store (so nodes can be restarted from it) and applies committed
entries to a hash-chain state machine while checking, on every apply, that
entries arrive exactly once, in order, and agree with every other node.

The randomized test takes its seeds from ``RAFT_CORE_SEED`` (one seed, to
replay a failure) or runs ``RAFT_CORE_SEEDS`` seeds (default 24) from
``RAFT_CORE_SEED_BASE`` (default 1); a failing seed is in the message.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable, Iterable

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from raft.core import RaftCore
from raft.errors import NotLeaderError
from raft.types import (
    Entry,
    HardState,
    Message,
    MessageType,
    RaftConfig,
    ReadState,
    Ready,
    Role,
    Snapshot,
    SnapshotMeta,
)

MAX_ROUNDS = 2000


class MemStore:
    """What one node has on 'disk': everything from the Ready batches it
    processed, written before their messages left."""

    def __init__(self) -> None:
        self.hard = HardState()
        self.snapshot: Snapshot | None = None
        self.entries: list[Entry] = []

    def save(self, rd: Ready) -> None:
        if rd.snapshot is not None:
            self.save_snapshot(rd.snapshot)
        if rd.entries:
            first = rd.entries[0].index
            self.entries = [e for e in self.entries if e.index < first] + list(rd.entries)
        if rd.hard_state is not None:
            self.hard = rd.hard_state

    def save_snapshot(self, snap: Snapshot) -> None:
        # The IStorage contract: entries after the snapshot stay only if the
        # log agrees with it at its index; otherwise they are a stale branch.
        meta = snap.meta
        agrees = any(e.index == meta.index and e.term == meta.term for e in self.entries) or (
            self.snapshot is not None
            and self.snapshot.meta.index == meta.index
            and self.snapshot.meta.term == meta.term
        )
        self.snapshot = snap
        self.entries = [e for e in self.entries if e.index > meta.index] if agrees else []


class Invariants:
    """Cluster-wide facts every node must agree with."""

    def __init__(self) -> None:
        self.committed: dict[int, tuple[int, bytes | None]] = {}
        # highest term any node had when the entry was first seen committed:
        # a leader of a later term must hold it (leader completeness)
        self.committed_seen_at_term: dict[int, int] = {}
        self.state_after: dict[int, bytes] = {}
        self.leader_of_term: dict[int, int] = {}
        # ReadIndex: a read must reflect every write committed (anywhere)
        # before it was asked: context -> highest commit index at that time
        self.read_floor: dict[bytes, int] = {}
        self.reads_served = 0

    def record_committed(self, index: int, term: int, data: bytes | None, now_term: int, where: str) -> None:
        known = self.committed.setdefault(index, (term, data))
        assert known == (term, data), f"{where}: committed entry {index} changed: {known} -> {(term, data)}"
        self.committed_seen_at_term.setdefault(index, now_term)


class StateMachine:
    """A hash chain of applied commands: two replicas agree on the state at
    index i iff they applied the same commands through i."""

    def __init__(self) -> None:
        self.index = 0
        self.digest = b"\0" * 32
        self.commands: list[bytes] = []

    def apply(self, e: Entry) -> None:
        assert e.index == self.index + 1, f"applied {e.index} after {self.index} (gap or repeat)"
        self.index = e.index
        if e.data is not None:
            self.digest = hashlib.sha256(self.digest + e.data).digest()
            self.commands.append(e.data)

    def snapshot(self) -> bytes:
        return self.index.to_bytes(8, "big") + self.digest

    def restore(self, data: bytes, index: int) -> None:
        assert int.from_bytes(data[:8], "big") == index, "snapshot data does not match its meta"
        self.index = index
        self.digest = data[8:]
        self.commands = [b"<snapshot>"]


class Harness:
    """One node: a core plus its store and state machine."""

    def __init__(self, node_id: int, config: RaftConfig, inv: Invariants, seed: int) -> None:
        self.id = node_id
        self.config = config
        self.inv = inv
        self.seed = seed
        self.store = MemStore()
        self.restarts = 0
        self.core = RaftCore(config, rng=random.Random(seed * 1000 + node_id))
        self.sm = StateMachine()
        self.read_states: list[ReadState] = []
        self.soft_changes = 0
        self.snapshots_received: list[Snapshot] = []
        # How many Readies to take before advancing any (a driver that
        # pipelines Ready handling); 1 is the plain loop.
        self.readies_per_batch = 1

    def restart(self) -> None:
        """Crash and restart from the store: volatile state is lost."""
        self.restarts += 1
        st = self.store
        self.core = RaftCore(
            self.config,
            hard_state=st.hard,
            snapshot=st.snapshot,
            entries=list(st.entries),
            rng=random.Random(self.seed * 1000 + self.id + 100 * self.restarts),
        )
        self.sm = StateMachine()
        if st.snapshot is not None:
            self.sm.restore(st.snapshot.data, st.snapshot.meta.index)
        self.read_states = []

    def process(self) -> list[Message]:
        out: list[Message] = []
        for _ in range(100):
            if not self.core.has_ready():
                return out
            batch = [self.core.ready()]
            while len(batch) < self.readies_per_batch and self.core.has_ready():
                batch.append(self.core.ready())
            for rd in batch:
                self._handle(rd, out)
            for rd in batch:
                self.core.advance(rd)
        raise AssertionError(f"node {self.id}: ready() never drained")

    def _handle(self, rd: Ready, out: list[Message]) -> None:
        self.store.save(rd)
        out.extend(rd.messages)
        if rd.snapshot is not None:
            self.snapshots_received.append(rd.snapshot)
            self.sm.restore(rd.snapshot.data, rd.snapshot.meta.index)
        for e in rd.committed_entries:
            self.inv.record_committed(e.index, e.term, e.data, self.core.term, f"node {self.id} apply")
            self.sm.apply(e)
            known = self.inv.state_after.setdefault(e.index, self.sm.digest)
            assert known == self.sm.digest, f"node {self.id}: state after {e.index} differs"
        for rs in rd.read_states:
            floor = self.inv.read_floor.pop(rs.context, None)
            if floor is not None:  # reads the randomized test tracks
                assert rs.index >= floor, f"node {self.id}: stale read {rs.context!r} at {rs.index} < {floor}"
                self.inv.reads_served += 1
        self.read_states.extend(rd.read_states)
        if rd.soft_state is not None:
            self.soft_changes += 1

    def compact(self) -> Snapshot:
        snap = self.core.compact(self.sm.index, self.sm.snapshot())
        self.store.save_snapshot(snap)
        return snap


Filter = Callable[[Message], bool]


class Network:
    """A cluster of cores and a router between them. ``drop`` filters say
    which messages are lost; ``cut`` links are partitioned both ways."""

    def __init__(self, n: int, seed: int = 0, **config: object) -> None:
        self.ids = tuple(range(1, n + 1))
        self.inv = Invariants()
        self.nodes = {
            i: Harness(i, RaftConfig(i, self.ids, **config), self.inv, seed)  # type: ignore[arg-type]
            for i in self.ids
        }
        self.inbox: list[Message] = []
        self.cut: set[frozenset[int]] = set()
        self.down: set[int] = set()
        self.filters: list[Filter] = []
        # rewrite messages in flight (e.g. strip entries)
        self.mutators: list[Callable[[Message], Message]] = []
        self.delivered: list[Message] = []
        self.dropped: list[Message] = []

    def core(self, i: int) -> RaftCore:
        return self.nodes[i].core

    # -- topology --------------------------------------------------------

    def isolate(self, i: int) -> None:
        for j in self.ids:
            if j != i:
                self.cut.add(frozenset((i, j)))

    def partition(self, *groups: Iterable[int]) -> None:
        self.cut.clear()
        side = {i: g for g, members in enumerate(groups) for i in members}
        for a in self.ids:
            for b in self.ids:
                if a < b and side.get(a) != side.get(b):
                    self.cut.add(frozenset((a, b)))

    def heal(self) -> None:
        self.cut.clear()
        self.filters.clear()
        self.mutators.clear()

    def allowed(self, m: Message) -> bool:
        if m.to in self.down or m.frm in self.down:
            return False
        if frozenset((m.frm, m.to)) in self.cut:
            return False
        return not any(f(m) for f in self.filters)

    # -- running -----------------------------------------------------------

    def process_all(self) -> None:
        for i in self.ids:
            if i not in self.down:
                self.inbox.extend(self.nodes[i].process())

    def deliver(self, m: Message) -> None:
        if self.allowed(m):
            for mutate in self.mutators:
                m = mutate(m)
            self.delivered.append(m)
            self.nodes[m.to].core.step(m)
        else:
            self.dropped.append(m)

    def stabilize(self) -> None:
        """Deliver messages (FIFO rounds) until nothing is left to do.

        A leader's new commit index rides on its next append; when none goes
        out, followers learn it on the leader's next tick: ``settle()``."""
        for _ in range(MAX_ROUNDS):
            self.process_all()
            if not self.inbox:
                self.check()
                return
            batch, self.inbox = self.inbox, []
            for m in batch:
                self.deliver(m)
        raise AssertionError("cluster did not settle")

    def settle(self) -> None:
        """``stabilize()``, then one tick so followers learn the latest
        commit index, and ``stabilize()`` again."""
        self.stabilize()
        self.tick()

    def tick(self, ticks: int = 1, nodes: Iterable[int] | None = None) -> None:
        for _ in range(ticks):
            for i in nodes if nodes is not None else self.ids:
                if i not in self.down:
                    self.nodes[i].core.tick()
            self.stabilize()

    def leaders(self) -> list[int]:
        return [i for i in self.ids if i not in self.down and self.core(i).role == Role.LEADER]

    def leader(self) -> int:
        ls = self.leaders()
        assert len(ls) >= 1, "no leader"
        return max(ls, key=lambda i: self.core(i).term)

    def elect(self, i: int) -> None:
        self.core(i).campaign()
        self.stabilize()
        assert self.core(i).role == Role.LEADER, f"node {i} not elected: {self.core(i).status()}"

    def wait_leader(self, max_ticks: int = 200) -> int:
        for _ in range(max_ticks):
            self.tick()
            live = [
                i for i in self.leaders() if self.core(i).term == max(self.core(j).term for j in self.ids)
            ]
            if live and all(self.core(j).leader == live[0] for j in self.ids if j not in self.down):
                return live[0]
        raise AssertionError("no leader elected")

    def propose(self, data: bytes) -> tuple[int, int]:
        return self.core(self.leader()).propose(data)

    def restart(self, i: int) -> None:
        self.nodes[i].restart()
        self.down.discard(i)

    # -- safety ------------------------------------------------------------

    def check(self) -> None:
        inv = self.inv
        cores = {i: self.nodes[i].core for i in self.ids}
        for i, c in cores.items():
            if c.role == Role.LEADER:
                prev = inv.leader_of_term.setdefault(c.term, i)
                assert prev == i, f"two leaders in term {c.term}: {prev} and {i}"
                # leader completeness for entries committed before its term
                for idx, seen_term in inv.committed_seen_at_term.items():
                    if seen_term < c.term and idx > c.snapshot_meta.index:
                        e = c.log_entries(idx, idx + 1)
                        assert e and (e[0].term, e[0].data) == inv.committed[idx], (
                            f"leader {i} (term {c.term}) lacks committed entry {idx}"
                        )
            # committed entries never change
            lo = c.snapshot_meta.index + 1
            for e in c.log_entries(lo, c.commit_index + 1):
                inv.record_committed(e.index, e.term, e.data, c.term, f"node {i} log")
        # log matching: same (index, term) implies identical prefixes
        ids = list(cores)
        for a_pos, a in enumerate(ids):
            for b in ids[a_pos + 1 :]:
                ca, cb = cores[a], cores[b]
                lo = max(ca.snapshot_meta.index, cb.snapshot_meta.index) + 1
                hi = min(ca.last_index, cb.last_index)
                ea, eb = ca.log_entries(lo, hi + 1), cb.log_entries(lo, hi + 1)
                # find the highest index where the terms agree
                k = len(ea) - 1
                while k >= 0 and ea[k].term != eb[k].term:
                    k -= 1
                assert ea[: k + 1] == eb[: k + 1], f"log matching violated between {a} and {b}"


def appends(msgs: Iterable[Message], to: int | None = None) -> list[Message]:
    return [m for m in msgs if m.type == MessageType.APPEND and (to is None or m.to == to)]


class ElectionTests(SynchronousTestCase):
    def test_single_leader_elected(self) -> None:
        net = Network(5, seed=1)
        leader = net.wait_leader()
        self.assertEqual(net.leaders(), [leader])
        term = net.core(leader).term
        self.assertGreaterEqual(term, 1)
        for i in net.ids:
            self.assertEqual(net.core(i).leader, leader)
            self.assertEqual(net.core(i).term, term)
        # the new leader's no-op commits everywhere (followers learn it on a tick)
        net.settle()
        self.assertTrue(all(net.core(i).commit_index == net.core(leader).last_index for i in net.ids))

    def test_randomized_timeouts_are_seeded_and_spread(self) -> None:
        def first_campaign_tick(seed: int) -> int:
            c = RaftCore(RaftConfig(1, (1, 2, 3)), rng=random.Random(seed))
            for t in range(1, 100):
                c.tick()
                if c.role != Role.FOLLOWER:
                    return t
            raise AssertionError("never campaigned")

        ticks = {first_campaign_tick(s) for s in range(30)}
        self.assertTrue(ticks <= set(range(6, 12)), ticks)
        self.assertGreater(len(ticks), 2)
        self.assertEqual(first_campaign_tick(7), first_campaign_tick(7))

    def test_single_node_cluster(self) -> None:
        net = Network(1)
        c = net.core(1)
        net.elect(1)
        self.assertEqual(c.commit_index, 1)
        index, term = c.propose(b"a")
        self.assertEqual((index, term), (2, 1))
        net.stabilize()
        self.assertEqual(c.commit_index, 2)
        self.assertEqual(net.nodes[1].sm.commands, [b"a"])
        c.read_index(b"r1")
        net.stabilize()
        self.assertEqual(net.nodes[1].read_states, [ReadState(2, b"r1")])

    def test_one_vote_per_term(self) -> None:
        c = RaftCore(RaftConfig(1, (1, 2, 3), pre_vote=False), rng=random.Random(0))
        c.step(Message(MessageType.VOTE, to=1, frm=2, term=5, index=0, log_term=0))
        c.step(Message(MessageType.VOTE, to=1, frm=3, term=5, index=0, log_term=0))
        # a repeated request from the candidate we voted for is granted again
        c.step(Message(MessageType.VOTE, to=1, frm=2, term=5, index=0, log_term=0))
        rd = c.ready()
        votes = [(m.to, m.reject) for m in rd.messages]
        self.assertEqual(votes, [(2, False), (3, True), (2, False)])
        self.assertEqual(rd.hard_state, HardState(5, 2, 0))
        self.assertTrue(rd.must_sync)

    def test_vote_requires_up_to_date_log(self) -> None:
        # voter log: terms [1, 1, 2]
        entries = [Entry(1, 1), Entry(1, 2), Entry(2, 3)]
        cases = [
            # (candidate last index, last term, granted)
            (3, 2, True),  # same
            (4, 2, True),  # longer, same term
            (2, 2, False),  # shorter, same last term
            (9, 1, False),  # longer but older last term
            (1, 3, True),  # shorter but newer last term
        ]
        for idx, lterm, granted in cases:
            c = RaftCore(
                RaftConfig(1, (1, 2, 3), pre_vote=False),
                hard_state=HardState(2, None, 0),
                entries=entries,
                rng=random.Random(0),
            )
            c.step(Message(MessageType.VOTE, to=1, frm=2, term=3, index=idx, log_term=lterm))
            (resp,) = c.ready().messages
            self.assertEqual(resp.type, MessageType.VOTE_RESP)
            self.assertEqual(not resp.reject, granted, (idx, lterm))
            self.assertEqual(c.vote, 2 if granted else None)

    def test_candidate_with_stale_log_loses(self) -> None:
        net = Network(3, seed=2)
        net.elect(1)
        net.isolate(3)
        net.propose(b"x")
        net.stabilize()
        net.heal()
        net.isolate(1)
        # node 3 misses an entry: 2 must refuse it, so 3 cannot win
        for _ in range(5):
            net.core(3).campaign()
            net.stabilize()
            self.assertNotEqual(net.core(3).role, Role.LEADER)
        net.tick(30, nodes=[2])
        net.core(2).campaign()
        net.stabilize()
        self.assertEqual(net.core(2).role, Role.LEADER)


class PreVoteAndQuorumTests(SynchronousTestCase):
    def _rejoin_after_partition(self, **config: object) -> tuple[Network, int, int, int]:
        net = Network(3, seed=3, **config)
        net.elect(1)
        term = net.core(1).term
        net.isolate(3)
        net.tick(60)  # node 3 times out many times
        net.heal()
        net.tick(10)
        return net, term, net.core(1).term, net.leader()

    def test_prevote_partitioned_node_does_not_disrupt(self) -> None:
        net, before, after, leader = self._rejoin_after_partition()
        self.assertEqual(net.core(3).role, Role.FOLLOWER)
        self.assertEqual(after, before)
        self.assertEqual(leader, 1)
        self.assertEqual(net.core(3).term, before)

    def test_without_prevote_rejoining_node_raises_term(self) -> None:
        # the contrast case: the same scenario disrupts the cluster
        net, before, _, _ = self._rejoin_after_partition(pre_vote=False, check_quorum=False)
        self.assertGreater(max(net.core(i).term for i in net.ids), before + 5)

    def test_check_quorum_isolated_leader_steps_down(self) -> None:
        net = Network(3, seed=4)
        net.elect(1)
        net.isolate(1)
        net.tick(net.core(1)._cfg.election_ticks * 2, nodes=[1])
        self.assertEqual(net.core(1).role, Role.FOLLOWER)
        self.assertIsNone(net.core(1).leader)

    def test_without_check_quorum_isolated_leader_stays(self) -> None:
        net = Network(3, seed=4, check_quorum=False)
        net.elect(1)
        net.isolate(1)
        net.tick(30, nodes=[1])
        self.assertEqual(net.core(1).role, Role.LEADER)

    def test_leader_lease_rejects_votes(self) -> None:
        net = Network(3, seed=5)
        net.elect(1)
        f = net.core(2)
        term = f.term
        # heard from the leader just now: a higher-term vote request is ignored
        f.step(Message(MessageType.VOTE, to=2, frm=3, term=term + 1, index=99, log_term=term))
        f.step(Message(MessageType.PRE_VOTE, to=2, frm=3, term=term + 1, index=99, log_term=term))
        self.assertEqual(f.term, term)
        self.assertEqual(f.leader, 1)
        self.assertEqual(net.nodes[2].process(), [])
        # a leader-transfer campaign overrides the lease
        f.step(
            Message(
                MessageType.VOTE, to=2, frm=3, term=term + 1, index=99, log_term=term, context=b"transfer"
            )
        )
        (resp,) = net.nodes[2].process()
        self.assertFalse(resp.reject)
        self.assertEqual(f.term, term + 1)

    def test_lease_expires_after_election_timeout(self) -> None:
        net = Network(3, seed=5)
        net.elect(1)
        net.isolate(1)
        f = net.core(2)
        # stay under the randomized timeout's minimum... then past the lease
        for _ in range(net.nodes[2].config.election_ticks):
            f.tick()
        self.assertEqual(f.role, Role.FOLLOWER)
        f.step(Message(MessageType.PRE_VOTE, to=2, frm=3, term=f.term + 1, index=99, log_term=f.term))
        msgs = net.nodes[2].process()
        self.assertEqual([(m.type, m.reject) for m in msgs], [(MessageType.PRE_VOTE_RESP, False)])

    def test_followers_of_a_dead_leader_elect_within_heartbeat_ticks(self) -> None:
        # A leader whose process died closes its connections: its followers
        # hear of it at once and need not wait out an election timeout.
        for seed in range(20):
            net = Network(3, seed=seed)
            net.elect(1)
            term = net.core(1).term
            net.down.add(1)
            self.assertTrue(net.core(2).leader_unreachable(1), f"seed={seed}")
            self.assertTrue(net.core(3).leader_unreachable(1), f"seed={seed}")
            # One tick of each in turn: real tickers run out of phase.
            for _ in range(net.nodes[2].config.heartbeat_ticks):
                net.tick(1, nodes=[2])
                net.tick(1, nodes=[3])
                if net.leaders():
                    break
            self.assertTrue(net.leaders(), f"seed={seed}: no leader within heartbeat_ticks ticks")
            self.assertGreater(net.core(net.leader()).term, term)

    def test_followers_of_a_dead_leader_take_turns(self) -> None:
        # All four hear of it at once; ticking them in the worst order
        # (highest id first) still gives one campaign and one new term.
        net = Network(5, seed=9)
        net.elect(1)
        term = net.core(1).term
        net.down.add(1)
        for i in (2, 3, 4, 5):
            self.assertTrue(net.core(i).leader_unreachable(1))
        net.tick(1, nodes=[5, 4, 3, 2])
        self.assertEqual(net.leaders(), [2])
        self.assertEqual({net.core(i).term for i in (2, 3, 4, 5)}, {term + 1})

    def test_an_unreachable_leader_that_is_alive_keeps_leading(self) -> None:
        # Only node 2's connection broke: node 3 still hears the leader and
        # refuses node 2's pre-vote; the leader's next heartbeat brings node
        # 2 back. No term changes.
        net = Network(3, seed=7)
        net.elect(1)
        term = net.core(1).term
        self.assertTrue(net.core(2).leader_unreachable(1))
        self.assertIsNone(net.core(2).leader)
        net.tick(net.nodes[2].config.heartbeat_ticks)
        self.assertEqual(net.leaders(), [1])
        self.assertEqual([net.core(i).term for i in net.ids], [term] * 3)
        self.assertEqual(net.core(2).leader, 1)

    def test_unreachable_peer_that_is_not_the_leader_changes_nothing(self) -> None:
        net = Network(3, seed=8)
        net.elect(1)
        self.assertFalse(net.core(2).leader_unreachable(3))
        self.assertFalse(net.core(1).leader_unreachable(2))  # a leader has no leader
        self.assertEqual(net.core(2).leader, 1)
        without = Network(3, seed=8, pre_vote=False, check_quorum=False)
        without.elect(1)
        self.assertFalse(without.core(2).leader_unreachable(1), "not without pre-vote: it would disrupt")
        self.assertEqual(without.core(2).leader, 1)

    def test_stale_leader_learns_new_term(self) -> None:
        net = Network(3, seed=6, check_quorum=False)
        net.elect(1)
        net.isolate(1)
        net.tick(30, nodes=[2, 3])
        new = net.leader()
        self.assertIn(new, (2, 3))
        self.assertEqual(net.core(1).role, Role.LEADER)  # does not know yet
        net.heal()
        net.core(1).broadcast_heartbeat()
        net.stabilize()
        self.assertEqual(net.core(1).role, Role.FOLLOWER)
        self.assertEqual(net.leaders(), [new])


class ReplicationTests(SynchronousTestCase):
    def test_replication_and_commit(self) -> None:
        net = Network(3, seed=7)
        net.elect(1)
        for k in range(20):
            net.propose(b"cmd%d" % k)
            if k % 3 == 0:
                net.stabilize()
        net.settle()
        expected = [b"cmd%d" % k for k in range(20)]
        for i in net.ids:
            self.assertEqual(net.nodes[i].sm.commands, expected)
            self.assertEqual(net.core(i).commit_index, 21)
            self.assertEqual(net.core(i).applied_index, 21)

    def test_commit_needs_majority(self) -> None:
        net = Network(5, seed=8)
        net.elect(1)
        net.partition([1, 2], [3, 4, 5])
        index, _ = net.core(1).propose(b"minority")
        net.tick(3, nodes=[1])
        self.assertLess(net.core(1).commit_index, index)
        self.assertEqual(net.nodes[1].sm.commands, [])
        net.heal()
        net.tick(2, nodes=[1])  # the next heartbeat answers trigger the resend
        self.assertEqual(net.core(1).commit_index, index)

    def test_leader_counts_itself_only_after_persisting(self) -> None:
        net = Network(3, seed=9)
        net.elect(1)
        leader = net.core(1)
        index, _ = leader.propose(b"x")
        rd = leader.ready()
        # deliver the appends and let followers ack, but the leader has not
        # advanced: one follower ack + unpersisted leader = not a majority...
        for m in rd.messages:
            if m.to == 2:
                net.core(2).step(m)
        for m in net.nodes[2].process():
            leader.step(m)
        # ...a follower ack is a majority of 3 only with the leader's own copy
        self.assertLess(leader.commit_index, index)
        leader.advance(rd)
        self.assertEqual(leader.commit_index, index)

    def test_batching_one_append_per_follower(self) -> None:
        net = Network(3, seed=10)
        net.elect(1)
        leader = net.core(1)
        for k in range(10):
            leader.propose(b"b%d" % k)
        rd = leader.ready()
        self.assertEqual(len(rd.entries), 10)
        for to in (2, 3):
            (m,) = appends(rd.messages, to)
            self.assertEqual([e.data for e in m.entries], [b"b%d" % k for k in range(10)])
        leader.advance(rd)
        net.inbox.extend(rd.messages)
        net.settle()
        self.assertEqual(len(net.nodes[3].sm.commands), 10)

    def test_batches_respect_entry_and_byte_limits(self) -> None:
        net = Network(3, seed=10, max_entries_per_msg=4, max_bytes_per_msg=200)
        net.elect(1)
        leader = net.core(1)
        for _ in range(10):
            leader.propose(b"s")
        sizes = [len(m.entries) for m in appends(leader.ready().messages, 2)]
        self.assertEqual(sizes, [4, 4, 2])
        for _ in range(3):
            leader.propose(b"L" * 150)
        sizes = [len(m.entries) for m in appends(leader.ready().messages, 2)]
        self.assertEqual(sizes, [1, 1, 1])

    def test_pipelining_bounded_by_inflight_window(self) -> None:
        net = Network(3, seed=11, max_inflight_msgs=3)
        net.elect(1)
        leader = net.core(1)
        in_flight: list[Message] = []
        for k in range(5):
            leader.propose(b"p%d" % k)
            rd = leader.ready()
            in_flight += appends(rd.messages, 2)
            leader.advance(rd)
        # three appends went out without waiting for any answer, then it stopped
        self.assertEqual(len(in_flight), 3)
        self.assertEqual(leader.status()["progress"][2]["state"], "replicate")
        self.assertEqual(leader.status()["progress"][2]["inflight"], 3)
        # an ack of the first frees the window: the rest goes out in one message
        net.core(2).step(in_flight[0])
        for m in net.nodes[2].process():
            leader.step(m)
        more = appends(leader.ready().messages, 2)
        self.assertEqual(len(more), 1)
        self.assertEqual([e.data for e in more[0].entries], [b"p3", b"p4"])

    def test_rejection_returns_follower_to_probe(self) -> None:
        net = Network(3, seed=12, max_inflight_msgs=8)
        net.elect(1)
        leader = net.core(1)
        for k in range(3):
            leader.propose(b"q%d" % k)
            net.nodes[1].process()
        self.assertEqual(leader.status()["progress"][2]["state"], "replicate")
        match = leader.status()["progress"][2]["match"]
        # follower 2 says it does not have what the leader thought it sent
        leader.step(
            Message(
                MessageType.APPEND_RESP,
                to=1,
                frm=2,
                term=leader.term,
                index=leader.last_index - 1,
                reject=True,
                reject_hint=match,
            )
        )
        pr = leader.status()["progress"][2]
        self.assertEqual(pr["state"], "probe")
        self.assertEqual(pr["next"], match + 1)
        # probing: one append at a time until it is answered
        leader.propose(b"q3")
        self.assertEqual(len(appends(leader.ready().messages, 2)), 1)
        leader.propose(b"q4")
        self.assertEqual(len(appends(leader.ready().messages, 2)), 0)

    def test_fast_backtracking_over_long_divergent_log(self) -> None:
        # nodes 1 and 3 agree on 1..1000 (term 1); node 2 holds a divergent
        # uncommitted tail 11..1000 written over three stale terms
        common = [Entry(1, i, b"c%d" % i) for i in range(1, 1001)]
        div = [Entry(1, i, b"c%d" % i) for i in range(1, 11)]
        div += [Entry(2 + (i - 11) * 3 // 990, i, b"d%d" % i) for i in range(11, 1001)]
        ids = (1, 2, 3)
        net = Network(3, seed=13)
        for i, entries in ((1, common), (2, div), (3, common)):
            cfg = RaftConfig(i, ids)
            net.nodes[i].store.hard = HardState(4, None, 10)
            net.nodes[i].store.entries = entries
            net.nodes[i].config = cfg
            net.restart(i)
        net.elect(1)
        net.stabilize()
        to2 = appends((m for m in net.delivered), 2)
        rejects = [m for m in net.delivered if m.type == MessageType.APPEND_RESP and m.frm == 2 and m.reject]
        # O(terms), not O(entries): a handful of probes for ~990 divergent entries
        self.assertLessEqual(len(rejects), 4, [(m.index, m.reject_hint, m.hint_term) for m in rejects])
        self.assertLessEqual(len(to2), 12)
        self.assertEqual(net.core(2).log_entries(1, 1002), net.core(1).log_entries(1, 1002))
        self.assertEqual(net.core(2).commit_index, 1001)

    def test_backtracking_when_follower_log_is_shorter(self) -> None:
        net = Network(3, seed=14)
        net.elect(1)
        net.isolate(3)
        for k in range(300):
            net.core(1).propose(b"x%d" % k)
        net.stabilize()
        net.heal()
        net.tick(2)
        self.assertEqual(net.core(3).commit_index, net.core(1).commit_index)
        rejects = [m for m in net.delivered if m.type == MessageType.APPEND_RESP and m.frm == 3 and m.reject]
        self.assertLessEqual(len(rejects), 2)

    def test_figure8_leader_never_commits_old_term_entry_by_counting(self) -> None:
        # Figure 8 of the Raft paper. Pre-vote/check-quorum off so elections
        # can be steered with campaign(); one entry per append.
        net = Network(5, seed=15, max_entries_per_msg=1, pre_vote=False, check_quorum=False)

        def win(i: int) -> None:
            for _ in range(10):
                net.core(i).campaign()
                net.stabilize()
                if net.core(i).role == Role.LEADER:
                    return
            raise AssertionError(f"node {i} could not win: {net.core(i).status()}")

        # (a) S1 leads term t1 and gets entry X onto S2 only
        win(1)
        t1 = net.core(1).term
        net.partition([1, 2], [3, 4, 5])
        x_index, _ = net.core(1).propose(b"X")
        net.stabilize()
        self.assertEqual(net.core(2).log_term(x_index), t1)
        # (b) S5 wins a later term with S3, S4 and writes its no-op at
        # X's index, but replicates nothing
        net.partition([1], [2], [3, 4, 5])
        net.filters.append(lambda m: m.type == MessageType.APPEND and m.frm == 5)
        win(5)
        self.assertEqual(net.core(5).log_term(x_index), net.core(5).term)
        # (c) S1 restarts and wins a still later term with S2, S3, S4; it
        # gets X onto S3 and S4, but every copy of its own no-op is lost
        net.filters.clear()
        net.partition([5], [1, 2, 3, 4])
        net.mutators.append(
            lambda m: (
                Message(
                    m.type,
                    m.to,
                    m.frm,
                    m.term,
                    m.log_term,
                    m.index,
                    [e for e in m.entries if e.term <= t1],
                    m.commit,
                )
                if m.type == MessageType.APPEND
                else m
            )
        )
        net.restart(1)  # S1 crashed meanwhile; it restarts from its disk
        win(1)
        s1 = net.core(1)
        self.assertGreater(s1.term, net.core(5).term)
        net.tick(4, nodes=[1])
        holders = [i for i in net.ids if net.core(i).log_term(x_index) == t1]
        self.assertEqual(holders, [1, 2, 3, 4])  # X sits on a majority...
        self.assertLess(s1.commit_index, x_index)  # ...yet S1 does not count it committed
        for i in net.ids:
            self.assertLess(net.core(i).commit_index, x_index)
        # (d) which is what makes it safe for S5 to win again (its last term
        # beats X's) and overwrite X everywhere
        net.mutators.clear()
        net.partition([1], [2, 3, 4, 5])
        net.restart(5)  # S5, still leader of its old term, had crashed too
        win(5)
        net.stabilize()
        for i in (2, 3, 4, 5):
            self.assertNotEqual(net.core(i).log_term(x_index), t1)
        net.heal()
        idx, _ = net.propose(b"Y")
        net.tick(3)
        for i in net.ids:
            self.assertGreaterEqual(net.core(i).commit_index, idx)
            self.assertNotIn(b"X", net.nodes[i].sm.commands)
            self.assertEqual(net.nodes[i].sm.commands, [b"Y"])

    def test_figure8_contrast_old_entry_commits_with_current_term_entry(self) -> None:
        # the same step (c) without losing the no-op commits X with it
        net = Network(5, seed=16, pre_vote=False, check_quorum=False)
        net.core(1).campaign()
        net.stabilize()
        net.partition([1, 2], [3, 4, 5])
        x_index, _ = net.core(1).propose(b"X")
        net.stabilize()
        net.partition([1, 2, 3], [4, 5])
        net.tick(3, nodes=[1])
        self.assertEqual(net.core(1).commit_index, x_index)


def _sorted_terms(choices: list[int], max_size: int) -> st.SearchStrategy[list[int]]:
    return st.lists(st.sampled_from(choices), max_size=max_size).map(sorted)


class BacktrackingPropertyTests(SynchronousTestCase):
    @settings(deadline=None, max_examples=60)
    @given(
        prefix=_sorted_terms([1, 2, 3], 12),
        shared=_sorted_terms([4, 5], 10),
        extra_of_shared_term=st.integers(0, 6),
        leader_tail=_sorted_terms([6, 8, 10, 12], 40),
        follower_tail=_sorted_terms([7, 9, 11, 13, 15], 60),
    )
    def test_divergent_follower_converges_in_o_terms_probes(
        self,
        prefix: list[int],
        shared: list[int],
        extra_of_shared_term: int,
        leader_tail: list[int],
        follower_tail: list[int],
    ) -> None:
        # Logs that Raft could have produced: a committed prefix, entries
        # both hold, then tails whose terms differ at every index (leader
        # tails use even terms, the follower's odd ones). The follower may
        # also hold more entries of the last shared term than the leader got.
        common = [Entry(t, i + 1, b"c%d" % (i + 1)) for i, t in enumerate(prefix + shared)]
        extra = [shared[-1]] * extra_of_shared_term if shared else []
        base = len(common)
        leader_log = common + [Entry(t, base + k + 1, b"s%d" % k) for k, t in enumerate(leader_tail)]
        follower_log = common + [
            Entry(t, base + k + 1, b"s%d" % k) for k, t in enumerate(extra + follower_tail)
        ]
        net = Network(3, seed=17)
        for i, log in ((1, leader_log), (2, follower_log), (3, leader_log)):
            net.nodes[i].store.hard = HardState(20, None, len(prefix))
            net.nodes[i].store.entries = list(log)
            net.restart(i)
        net.elect(1)
        net.settle()
        leader = net.core(1)
        last = leader.last_index
        self.assertEqual(net.core(2).log_entries(1, last + 1), leader.log_entries(1, last + 1))
        self.assertEqual(net.core(2).commit_index, last)
        rejects = [m for m in net.delivered if m.type == MessageType.APPEND_RESP and m.frm == 2 and m.reject]
        # one probe per conflicting term of the follower, plus one if it was shorter
        conflicting_terms = len(set(extra + follower_tail))
        self.assertLessEqual(
            len(rejects), conflicting_terms + 1, [(m.index, m.reject_hint, m.hint_term) for m in rejects]
        )


class ReadIndexTests(SynchronousTestCase):
    def test_read_confirmed_only_after_majority_ack(self) -> None:
        net = Network(5, seed=20)
        net.elect(1)
        leader = net.core(1)
        commit = leader.commit_index
        leader.read_index(b"r")
        rd = leader.ready()
        beats = [m for m in rd.messages if m.type == MessageType.HEARTBEAT]
        self.assertEqual(len(beats), 4)
        self.assertEqual(len({m.context for m in beats}), 1)
        leader.advance(rd)
        acks: list[Message] = []
        for m in beats:
            net.core(m.to).step(m)
            acks += net.nodes[m.to].process()
        self.assertEqual(len(acks), 4)
        leader.step(acks[0])
        self.assertEqual(leader.ready().read_states, [])  # 2 of 5
        leader.step(acks[1])
        self.assertEqual(leader.ready().read_states, [ReadState(commit, b"r")])  # 3 of 5
        leader.step(acks[2])
        self.assertFalse(leader.ready().read_states)  # exactly once

    def test_reads_asked_together_share_one_round(self) -> None:
        net = Network(3, seed=21)
        net.elect(1)
        leader = net.core(1)
        for k in range(5):
            leader.read_index(b"r%d" % k)
        rd = leader.ready()
        beats = [m for m in rd.messages if m.type == MessageType.HEARTBEAT]
        self.assertEqual(len(beats), 2)  # one round: one heartbeat per follower
        leader.advance(rd)
        net.inbox.extend(rd.messages)
        net.stabilize()
        self.assertEqual([r.context for r in net.nodes[1].read_states], [b"r%d" % k for k in range(5)])

    def test_lost_round_is_retried_by_periodic_heartbeats(self) -> None:
        net = Network(3, seed=22)
        net.elect(1)
        net.filters.append(lambda m: m.type == MessageType.HEARTBEAT_RESP)
        net.core(1).read_index(b"r")
        net.stabilize()
        self.assertEqual(net.nodes[1].read_states, [])
        net.filters.clear()
        net.tick(2, nodes=[1])
        self.assertEqual([r.context for r in net.nodes[1].read_states], [b"r"])

    def test_partitioned_deposed_leader_never_confirms_read(self) -> None:
        net = Network(3, seed=23, check_quorum=False)
        net.elect(1)
        net.isolate(1)
        net.tick(30, nodes=[2, 3])
        new = net.leader()
        net.propose(b"written on the other side")
        net.stabilize()
        old = net.core(1)
        self.assertEqual(old.role, Role.LEADER)
        old.read_index(b"stale")
        net.tick(20, nodes=[1])
        self.assertEqual(net.nodes[1].read_states, [])
        net.heal()
        net.tick(3)
        self.assertEqual(old.role, Role.FOLLOWER)
        self.assertEqual(old.leader, new)
        self.assertEqual(net.nodes[1].read_states, [])

    def test_new_leader_defers_reads_until_its_noop_commits(self) -> None:
        net = Network(3, seed=24)
        net.filters.append(lambda m: m.type == MessageType.APPEND)
        net.core(1).campaign()
        net.stabilize()
        leader = net.core(1)
        self.assertEqual(leader.role, Role.LEADER)
        noop = leader.last_index
        self.assertLess(leader.commit_index, noop)
        leader.read_index(b"r")
        rd = leader.ready()
        self.assertFalse([m for m in rd.messages if m.type == MessageType.HEARTBEAT])
        leader.advance(rd)
        net.tick(4, nodes=[1])  # heartbeats are acked, but the read still waits
        self.assertEqual(net.nodes[1].read_states, [])
        net.filters.clear()
        net.tick(2, nodes=[1])
        (rs,) = net.nodes[1].read_states
        self.assertEqual(rs, ReadState(noop, b"r"))

    def test_read_index_on_follower_refused(self) -> None:
        net = Network(3, seed=25)
        net.elect(2)
        with self.assertRaises(NotLeaderError) as cm:
            net.core(1).read_index(b"r")
        self.assertEqual(cm.exception.leader, 2)


class TransferTests(SynchronousTestCase):
    def test_transfer_to_lagging_follower(self) -> None:
        net = Network(3, seed=30)
        net.elect(1)
        net.isolate(3)
        for k in range(5):
            net.propose(b"t%d" % k)
        net.stabilize()
        net.heal()
        old_term = net.core(1).term
        target = net.core(1).last_index
        net.core(1).transfer_leader(3)
        with self.assertRaises(NotLeaderError) as cm:
            net.core(1).propose(b"refused")
        self.assertEqual(cm.exception.leader, 3)
        net.stabilize()
        tn = [m for m in net.delivered if m.type == MessageType.TIMEOUT_NOW]
        self.assertEqual(len(tn), 1)
        # TIMEOUT_NOW only after node 3 caught up to the leader's log
        catch_up = min(
            i
            for i, m in enumerate(net.delivered)
            if m.type == MessageType.APPEND_RESP and m.frm == 3 and not m.reject and m.index == target
        )
        self.assertLess(catch_up, net.delivered.index(tn[0]))
        self.assertEqual(net.core(3).role, Role.LEADER)
        self.assertEqual(net.core(3).term, old_term + 1)
        self.assertEqual(net.core(1).role, Role.FOLLOWER)
        idx, _ = net.propose(b"after")
        net.settle()
        self.assertEqual(net.nodes[1].sm.commands[-1], b"after")
        self.assertEqual(net.core(1).commit_index, idx)

    def test_transfer_aborts_after_election_timeout(self) -> None:
        net = Network(3, seed=31)
        net.elect(1)
        net.isolate(3)
        leader = net.core(1)
        leader.transfer_leader(3)
        self.assertEqual(leader.lead_transferee, 3)
        self.assertRaises(NotLeaderError, leader.propose, b"no")
        net.tick(leader._cfg.election_ticks, nodes=[1, 2])
        self.assertIsNone(leader.lead_transferee)
        self.assertEqual(leader.role, Role.LEADER)
        idx, _ = leader.propose(b"yes")
        net.stabilize()
        self.assertEqual(leader.commit_index, idx)

    def test_transfer_from_non_leader_refused(self) -> None:
        net = Network(3, seed=32)
        net.elect(1)
        self.assertRaises(NotLeaderError, net.core(2).transfer_leader, 3)
        self.assertRaises(ValueError, net.core(1).transfer_leader, 9)


class SnapshotTests(SynchronousTestCase):
    def test_compact_drops_entries(self) -> None:
        net = Network(3, seed=40)
        net.elect(1)
        for k in range(10):
            net.propose(b"c%d" % k)
        net.stabilize()
        c = net.core(1)
        snap = net.nodes[1].compact()
        self.assertEqual(snap.meta, SnapshotMeta(11, c.term, (1, 2, 3)))
        self.assertEqual(c.snapshot_meta, snap.meta)
        self.assertIsNone(c.log_term(10))
        self.assertEqual(c.log_term(11), c.term)
        self.assertEqual(c.log_entries(1, 20), [])
        self.assertRaises(ValueError, c.compact, 11, b"")  # already compacted
        self.assertRaises(ValueError, c.compact, 99, b"")  # not applied

    def test_lagging_follower_gets_chunked_snapshot_then_entries(self) -> None:
        net = Network(3, seed=41, snapshot_chunk_bytes=10)
        net.elect(1)
        net.isolate(3)
        for k in range(30):
            net.propose(b"s%d" % k)
        net.stabilize()
        net.nodes[1].compact()
        net.nodes[2].compact()
        for k in range(3):
            net.propose(b"after%d" % k)
        net.stabilize()
        net.heal()
        net.tick(3)
        chunks = [m for m in net.delivered if m.type == MessageType.SNAPSHOT and m.to == 3]
        self.assertEqual(len(chunks), 4)  # 40 bytes of state in 10-byte chunks
        self.assertEqual([m.offset for m in chunks], [0, 10, 20, 30])
        self.assertTrue(chunks[-1].done)
        (snap,) = net.nodes[3].snapshots_received
        self.assertEqual(snap.meta.index, 31)
        # ... then it continues with the entries after the snapshot
        self.assertEqual(net.core(3).commit_index, net.core(1).commit_index)
        self.assertEqual(net.nodes[3].sm.digest, net.nodes[1].sm.digest)
        self.assertEqual(net.nodes[3].sm.commands, [b"<snapshot>", b"after0", b"after1", b"after2"])
        self.assertEqual(net.core(1).status()["progress"][3]["state"], "replicate")

    def test_snapshot_survives_lost_chunks(self) -> None:
        net = Network(3, seed=42, snapshot_chunk_bytes=8)
        net.elect(1)
        net.isolate(3)
        for k in range(30):
            net.propose(b"s%d" % k)
        net.stabilize()
        net.nodes[1].compact()
        net.heal()
        lost: list[int] = []

        def lose_second_chunk_once(m: Message) -> bool:
            if m.type == MessageType.SNAPSHOT and m.offset == 8 and not lost:
                lost.append(m.offset)
                return True
            return False

        net.filters.append(lose_second_chunk_once)
        net.tick(12)
        self.assertEqual(lost, [8])
        self.assertEqual(len(net.nodes[3].snapshots_received), 1)
        self.assertEqual(net.nodes[3].sm.digest, net.nodes[1].sm.digest)

    def test_a_snapshot_past_max_snapshot_bytes_is_refused_and_not_buffered(self) -> None:
        # 40 bytes of state against a follower that takes at most 24: every
        # chunk that would pass the cap is rejected and the partial snapshot
        # dropped, so what the follower holds never passes the cap.
        net = Network(3, seed=43, snapshot_chunk_bytes=8, max_snapshot_bytes=24)
        net.elect(1)
        net.isolate(3)
        for k in range(30):
            net.propose(b"s%d" % k)
        net.stabilize()
        net.nodes[1].compact()
        net.heal()
        held: list[int] = []
        for _ in range(12):
            net.tick(1)
            held.append(net.core(3).incoming_snapshot_bytes)
        refused = [
            m for m in net.delivered if m.type == MessageType.SNAPSHOT_RESP and m.frm == 3 and m.reject
        ]
        self.assertTrue(refused, "no chunk was refused")
        self.assertLessEqual(max(held), 24)
        self.assertEqual(net.nodes[3].snapshots_received, [])
        # The rest of the group goes on committing.
        before = net.core(1).commit_index
        net.propose(b"more")
        net.stabilize()
        self.assertEqual(net.core(1).commit_index, before + 1)

    def test_max_snapshot_bytes_must_hold_a_chunk(self) -> None:
        with self.assertRaises(ValueError):
            Network(3, snapshot_chunk_bytes=8, max_snapshot_bytes=4)

    def test_follower_with_snapshot_entries_only_fast_forwards(self) -> None:
        c = RaftCore(
            RaftConfig(2, (1, 2, 3)), hard_state=HardState(1, None, 0), entries=[Entry(1, 1), Entry(1, 2)]
        )
        meta = SnapshotMeta(2, 1, (1, 2, 3))
        c.step(Message(MessageType.SNAPSHOT, to=2, frm=1, term=1, snapshot_meta=meta, data=b"s", done=True))
        rd = c.ready()
        self.assertIsNone(rd.snapshot)
        self.assertEqual([e.index for e in rd.committed_entries], [1, 2])


class RestartTests(SynchronousTestCase):
    def test_restart_hands_out_committed_entries_after_snapshot(self) -> None:
        entries = [Entry(2, i, b"e%d" % i) for i in range(6, 11)]
        snap = Snapshot(SnapshotMeta(5, 2, (1, 2, 3)), b"state")
        c = RaftCore(RaftConfig(1, (1, 2, 3)), hard_state=HardState(3, 2, 8), snapshot=snap, entries=entries)
        self.assertEqual((c.term, c.vote, c.commit_index, c.applied_index, c.last_index), (3, 2, 8, 5, 10))
        self.assertEqual(c.role, Role.FOLLOWER)
        rd = c.ready()
        self.assertEqual([e.index for e in rd.committed_entries], [6, 7, 8])
        self.assertEqual(rd.entries, [])  # already on disk
        self.assertIsNone(rd.hard_state)
        c.advance(rd)
        self.assertEqual(c.applied_index, 8)
        self.assertFalse(c.has_ready())

    def test_restart_rejects_inconsistent_state(self) -> None:
        cfg = RaftConfig(1, (1, 2, 3))
        with self.assertRaises(ValueError):
            RaftCore(cfg, entries=[Entry(1, 1), Entry(1, 3)])
        with self.assertRaises(ValueError):
            RaftCore(cfg, hard_state=HardState(1, None, 5), entries=[Entry(1, 1)])
        with self.assertRaises(ValueError):
            RaftCore(cfg, hard_state=HardState(1, None, 0), entries=[Entry(2, 1)])

    def test_cluster_restart_keeps_committed_state(self) -> None:
        net = Network(3, seed=50)
        net.elect(1)
        for k in range(10):
            net.propose(b"k%d" % k)
        net.stabilize()
        net.nodes[2].compact()
        for k in range(10, 15):
            net.propose(b"k%d" % k)
        net.stabilize()
        before = {i: net.nodes[i].sm.digest for i in net.ids}
        for i in net.ids:
            net.restart(i)
        net.stabilize()  # restarted nodes re-apply from their stores
        self.assertEqual({i: net.nodes[i].sm.digest for i in net.ids}, before)
        leader = net.wait_leader()
        idx, _ = net.core(leader).propose(b"again")
        net.settle()
        for i in net.ids:
            self.assertEqual(net.core(i).commit_index, idx)
            self.assertEqual(net.nodes[i].sm.commands[-1], b"again")

    def test_committed_entries_exactly_once_in_order(self) -> None:
        net = Network(3, seed=51)
        net.elect(1)
        leader = net.core(1)
        handed: list[int] = []
        for k in range(30):
            leader.propose(b"o%d" % k)
            if k % 4 == 0:
                # call ready() several times before advancing: nothing repeats
                rd1 = leader.ready()
                rd2 = leader.ready()
                for rd in (rd1, rd2):
                    net.inbox.extend(rd.messages)
                    handed += [e.index for e in rd.committed_entries]
                for rd in (rd1, rd2):
                    net.nodes[1].store.save(rd)
                    leader.advance(rd)
            for m in list(net.inbox):
                net.inbox.remove(m)
                net.deliver(m)
            for i in (2, 3):
                net.inbox.extend(net.nodes[i].process())
        for _ in range(10):
            rd = leader.ready()
            handed += [e.index for e in rd.committed_entries]
            net.inbox.extend(rd.messages)
            leader.advance(rd)
            for m in list(net.inbox):
                net.inbox.remove(m)
                net.deliver(m)
            for i in (2, 3):
                net.inbox.extend(net.nodes[i].process())
        self.assertEqual(handed, sorted(set(handed)))
        self.assertEqual(handed, list(range(handed[0], leader.commit_index + 1)))


class RobustnessTests(SynchronousTestCase):
    def test_bad_messages_refused_without_crashing(self) -> None:
        net = Network(3, seed=60)
        net.elect(1)
        net.settle()  # the follower learns that the no-op is committed
        f = net.core(2)
        term = f.term
        bad = [
            Message(MessageType.APPEND, to=9, frm=1, term=term),  # not for us
            Message(MessageType.APPEND, to=2, frm=7, term=term),  # a second leader of the term
            Message(MessageType.APPEND, to=2, frm=2, term=term),  # from ourselves
            Message(MessageType.APPEND, to=2, frm=1, term=0),  # no term
            # gap in entries
            Message(
                MessageType.APPEND, to=2, frm=1, term=term, index=1, log_term=term, entries=[Entry(term, 3)]
            ),
            # entry term beyond the message's term
            Message(
                MessageType.APPEND,
                to=2,
                frm=1,
                term=term,
                index=1,
                log_term=term,
                entries=[Entry(term + 5, 2)],
            ),
            Message(MessageType.SNAPSHOT, to=2, frm=1, term=term),  # no meta
        ]
        with self.assertLogs("raft.core", "WARNING") as logs:
            for m in bad:
                f.step(m)
        self.assertEqual(f.refused, len(bad))
        self.assertEqual(len(logs.records), len(bad))
        self.assertEqual((f.term, f.last_index, f.leader), (term, 1, 1))
        # an append that would overwrite the committed entry is answered
        # with our commit index instead
        f.step(
            Message(
                MessageType.APPEND,
                to=2,
                frm=1,
                term=term + 1,
                index=0,
                log_term=0,
                entries=[Entry(term + 1, 1)],
                commit=0,
            )
        )
        self.assertEqual(f.log_term(1), term)
        # (its higher term deposes the leader, but the cluster recovers)
        leader = net.wait_leader()
        net.core(leader).propose(b"still fine")
        net.settle()
        self.assertEqual(net.nodes[2].sm.commands, [b"still fine"])

    def test_propose_requires_bytes_and_leadership(self) -> None:
        net = Network(3, seed=61)
        net.elect(1)
        self.assertRaises(TypeError, net.core(1).propose, "text")
        with self.assertRaises(NotLeaderError) as cm:
            net.core(2).propose(b"x")
        self.assertEqual(cm.exception.leader, 1)


class CommitPropagationTests(SynchronousTestCase):
    """A new commit index is not sent on its own: it rides on the next
    append, or goes out on the leader's next tick (at most one tick late)."""

    def commit_then_hold(self, net: Network) -> tuple[int, list[Message]]:
        """Propose one entry and let it commit on the leader (node 1); returns
        its index and what the leader sent after the commit (not delivered)."""
        idx, _ = net.core(1).propose(b"x")
        net.process_all()
        for _ in range(10):  # appends out, acks back; no tick
            batch, net.inbox = net.inbox, []
            for m in batch:
                net.deliver(m)
            net.process_all()
            if net.core(1).commit_index >= idx:
                break
        self.assertEqual(net.core(1).commit_index, idx)
        net.process_all()
        after, net.inbox = net.inbox, []
        return idx, after

    def test_commit_alone_sends_nothing_until_the_tick(self) -> None:
        # Heartbeats every 4 ticks, so the tick below sends none.
        net = Network(3, seed=70, heartbeat_ticks=4, election_ticks=10)
        net.elect(1)
        net.settle()
        idx, after = self.commit_then_hold(net)
        self.assertEqual(appends(after), [])
        self.assertLess(net.core(2).commit_index, idx)
        net.core(1).tick()
        rd = net.core(1).ready()
        updates = appends(rd.messages)
        self.assertEqual(sorted(m.to for m in updates), [2, 3])
        self.assertTrue(all(m.commit == idx and not m.entries for m in updates))
        net.core(1).advance(rd)
        net.inbox.extend(rd.messages)
        net.stabilize()
        self.assertEqual([net.core(i).commit_index for i in net.ids], [idx] * 3)

    def test_commit_rides_on_the_next_append(self) -> None:
        net = Network(3, seed=71)
        net.elect(1)
        net.settle()
        idx, _ = self.commit_then_hold(net)
        net.core(1).propose(b"y")
        rd = net.core(1).ready()
        for to in (2, 3):
            (m,) = appends(rd.messages, to)
            self.assertEqual((m.commit, [e.data for e in m.entries]), (idx, [b"y"]))
        net.core(1).advance(rd)
        net.inbox.extend(rd.messages)
        net.stabilize()
        self.assertEqual(net.core(2).commit_index, idx)
        # ...and the tick after it has nothing left to say but heartbeats
        # for the second entry's own commit.
        net.core(1).tick()
        rd = net.core(1).ready()
        self.assertTrue(all(m.commit == idx + 1 and not m.entries for m in appends(rd.messages)))
        net.core(1).advance(rd)

    def test_idle_ticks_send_no_commit_updates(self) -> None:
        net = Network(3, seed=72)
        net.elect(1)
        net.propose(b"x")
        net.settle()
        for _ in range(2 * net.core(1)._cfg.election_ticks):
            net.core(1).tick()
            rd = net.core(1).ready()
            self.assertEqual(appends(rd.messages), [])
            net.core(1).advance(rd)
            net.inbox.extend(rd.messages)
            net.stabilize()

    def test_lost_commit_update_is_repaired_by_a_heartbeat(self) -> None:
        net = Network(3, seed=73, heartbeat_ticks=4, election_ticks=10)
        net.elect(1)
        net.settle()  # the leader's heartbeat clock is at 1 of 4
        idx, _ = self.commit_then_hold(net)
        net.filters.append(lambda m: m.type == MessageType.APPEND)  # the tick's update is lost
        net.tick()
        self.assertLess(net.core(2).commit_index, idx)
        net.filters.clear()
        net.tick()  # the update counts as sent: no second one...
        self.assertLess(net.core(2).commit_index, idx)
        net.tick()  # ...the heartbeat, which always carries the commit index, repairs it
        self.assertEqual([net.core(i).commit_index for i in net.ids], [idx] * 3)

    def test_follower_that_restarted_learns_commit_again(self) -> None:
        net = Network(3, seed=74)
        net.elect(1)
        net.propose(b"x")
        net.settle()
        net.nodes[2].store.hard = HardState(net.nodes[2].store.hard.term, net.nodes[2].store.hard.vote, 0)
        net.restart(2)  # its commit index was not persisted (it need not be)
        self.assertEqual(net.core(2).commit_index, 0)
        net.tick(net.core(1)._cfg.heartbeat_ticks)
        self.assertEqual(net.core(2).commit_index, net.core(1).commit_index)
        self.assertEqual(net.nodes[2].sm.commands, [b"x"])


# -- randomized ------------------------------------------------------------


def _seeds() -> list[int]:
    """``RAFT_CORE_SEED=n`` replays seed n alone; ``RAFT_CORE_SEEDS=count``
    (default 24) runs that many seeds from ``RAFT_CORE_SEED_BASE`` (default 1)."""
    env = os.environ.get("RAFT_CORE_SEED", "").strip()
    if env:
        return [int(env)]
    count = int(os.environ.get("RAFT_CORE_SEEDS", "").strip() or 24)
    base = int(os.environ.get("RAFT_CORE_SEED_BASE", "").strip() or 1)
    return list(range(base, base + count))


_ACTIONS = ("deliver", "tick", "propose", "partition", "heal", "crash", "compact", "read", "transfer")
_WEIGHTS = (55, 20, 12, 1.5, 2, 2, 2, 4, 0.5)


def run_random_schedule(seed: int, steps: int = 4000) -> Network:
    """Random ticks, deliveries (with loss, reordering, duplication),
    partitions, crashes/restarts, compactions and proposals; the safety
    invariants are checked after every step."""
    rnd = random.Random(seed)
    n = rnd.choice((3, 5))
    net = Network(
        n,
        seed=seed,
        max_entries_per_msg=rnd.choice((1, 3, 64)),
        max_inflight_msgs=rnd.choice((1, 2, 8)),
        snapshot_chunk_bytes=rnd.choice((7, 1000)),
        pre_vote=rnd.random() < 0.8,
        check_quorum=rnd.random() < 0.8,
    )
    for h in net.nodes.values():
        h.readies_per_batch = rnd.choice((1, 1, 3))
    pending: list[Message] = []
    proposed = 0
    reads = 0
    # Connections lost between live servers (a reset, a timeout) draw from
    # a stream of their own, so every seed's schedule is otherwise the one
    # it was before servers were told of lost connections.
    lost = random.Random(seed * 7919 + 1)
    for _ in range(steps):
        if lost.random() < 0.01:
            i, j = lost.sample(list(net.ids), 2)
            if i not in net.down:
                net.core(i).leader_unreachable(j)
        action = rnd.choices(_ACTIONS, _WEIGHTS)[0]
        if action == "deliver" and pending:
            # mostly in order, sometimes reordered, lost or duplicated
            m = pending.pop(0 if rnd.random() < 0.7 else rnd.randrange(len(pending)))
            if rnd.random() >= 0.08:
                if rnd.random() < 0.04:
                    pending.append(m)
                net.deliver(m)
        elif action == "tick":
            i = rnd.choice(net.ids)
            if i not in net.down:
                net.core(i).tick()
        elif action == "propose":
            leaders = net.leaders()
            if leaders:
                try:
                    net.core(rnd.choice(leaders)).propose(b"v%d" % proposed)
                    proposed += 1
                except NotLeaderError:
                    pass  # transfer in progress
        elif action == "partition":
            ids = list(net.ids)
            rnd.shuffle(ids)
            k = rnd.randrange(1, n)
            net.partition(ids[:k], ids[k:])
        elif action == "heal":
            net.heal()
        elif action == "crash":
            i = rnd.choice(net.ids)
            if i in net.down:
                net.restart(i)
            elif len(net.down) < (n - 1) // 2:
                net.down.add(i)
                # Its connections close: those it can reach hear of it.
                for j in net.ids:
                    if j != i and j not in net.down and frozenset((i, j)) not in net.cut:
                        net.core(j).leader_unreachable(i)
        elif action == "compact":
            h = net.nodes[rnd.choice(net.ids)]
            if h.id not in net.down and h.sm.index > h.core.snapshot_meta.index:
                h.compact()
        elif action == "read":
            leaders = net.leaders()
            if leaders:
                context = b"read%d" % reads
                reads += 1
                net.inv.read_floor[context] = max(net.core(i).commit_index for i in net.ids)
                net.core(rnd.choice(leaders)).read_index(context)
        elif action == "transfer":
            leaders = net.leaders()
            if leaders:
                net.core(rnd.choice(leaders)).transfer_leader(rnd.choice(net.ids))
        for i in net.ids:
            if i not in net.down:
                pending.extend(net.nodes[i].process())
        if len(pending) > 300:
            del pending[: len(pending) - 300]
        net.check()
    # liveness after the storm: heal everything and the cluster makes progress
    for i in list(net.down):
        net.restart(i)
    net.heal()
    for _ in range(50):
        leader = net.wait_leader(max_ticks=300)
        try:
            idx, _ = net.core(leader).propose(b"final")
            break
        except NotLeaderError:
            net.tick()  # a leader transfer is still in progress
    else:
        raise AssertionError("no leader accepted the final proposal")
    for _ in range(100):
        net.tick()
        if all(net.core(i).commit_index >= idx for i in net.ids):
            return net
    raise AssertionError(
        f"final entry {idx} not committed everywhere: {[net.core(i).status() for i in net.ids]}"
    )


class RandomizedSafetyTests(SynchronousTestCase):
    def test_random_schedules_keep_safety(self) -> None:
        served = 0
        seeds = _seeds()
        quiet: list[int] = []
        for seed in seeds:
            try:
                net = run_random_schedule(seed)
            except AssertionError as e:
                raise AssertionError(f"seed {seed} (replay with RAFT_CORE_SEED={seed}): {e}") from e
            # The schedules must exercise the protocol, not idle. A rare seed
            # whose storm of crashes and partitions leaves no leader for most
            # of the run commits little (about 2% of seeds): tolerated one in
            # twenty, never for a seed replayed alone.
            if len(net.inv.committed) <= 20:
                quiet.append(seed)
            self.assertGreater(len(net.inv.leader_of_term), 1, f"seed {seed}")
            served += net.inv.reads_served
        self.assertLessEqual(len(quiet), len(seeds) // 20, f"seeds that committed <= 20 entries: {quiet}")
        if len(seeds) > 1:
            self.assertGreater(served, 20)  # reads were exercised, not all dropped
