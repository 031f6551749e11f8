"""The ShardMaster as a service, in simulated time, driven by the real client.

Each test runs a ``SimReplicaGroup``: n RaftNodes over ``raft.testing.simnet``
(Raft messages), a ``ShardMasterStateMachine`` and a ``ShardMasterReplica``
per live node, the real ShardMaster method table served on a
``SimRpcNetwork`` (the real ``RpcServerProtocol`` dispatch and validation),
and ``ShardMasterClient``s (leader hints, retries, backoff, dedup ids) on
simulated pools. Everything runs on one ``Clock`` advanced in small steps.

What is shown:

- the shard-controller lab behaviours end to end through the client (basic
  sequences, historical queries, concurrent joins and leaves, minimal
  transfers, multi-group joins and leaves, more groups than shards, moves
  that hold until the next rebalance);
- bad input through the real method table: a clear BAD_REQUEST and no new map;
- under drops, crashes, restarts and partitions of the replicas, concurrent
  admin clients produce ONE linear history of maps (``HistoryCheck``): the
  replicas end byte-identical, map numbers have no gaps, each map is its
  predecessor changed by exactly one acknowledged or unknown-outcome
  operation, acknowledged operations appear exactly once, and every answer
  respects real-time order (a read never goes back in time);
- a deposed leader neither answers a query from its stale map nor refuses a
  write from it.

Randomized tests take their seeds from ``raft.testing.simnet.sim_seeds``:
``RAFT_SEEDS=20`` runs more seeds, ``RAFT_SEED=7`` replays seed 7 alone;
every failure message names its seed.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from client.shardmaster_client import ShardMasterClient
from raft.testing.simnet import InvariantViolation, sim_seeds
from shardmaster import rebalance
from shardmaster.service import ShardMasterReplica, shardmaster_methods
from shardmaster.state import ShardMasterStateMachine
from surfshard.errors import BadRequest, Crashed, NotLeader, Timeout, Unavailable
from surfshard.shardmap import UNASSIGNED, ShardMap
from surfshard.testing.simrpc import SimReplicaGroup, resolve
from tests.simcalls import SimGroupTestCase

#: The lab's shard count.
NSHARDS = 10
STEP = 0.005
#: Errors after which a write's outcome is unknown to its caller.
UNKNOWN_OUTCOME = (Timeout, Unavailable, Crashed, NotLeader)


def make_replica(
    node: Any,
    machine: ShardMasterStateMachine,
    addresses: dict[int, str],
    reactor: Any,
    chaos: bool,
    transfer: Any,
) -> ShardMasterReplica:
    return ShardMasterReplica(node, machine, addresses, reactor, chaos=chaos, transfer=transfer)


def shardmaster_group(n: int = 3, seed: int = 0, *, nshards: int = NSHARDS, **kwargs: Any) -> SimReplicaGroup:
    """An n-replica ShardMaster in simulated time."""
    return SimReplicaGroup(
        n,
        seed,
        machine_factory=lambda _i: ShardMasterStateMachine(nshards),
        make_control=make_replica,
        methods=shardmaster_methods,
        **kwargs,
    )


def addrs(gid: int, n: int = 3) -> list[str]:
    """Node addresses of group ``gid``, distinct across gids."""
    return [f"g{gid}-n{i}.sim:{7000 + i}" for i in range(n)]


def moved(old: ShardMap, new: ShardMap) -> int:
    """Shards whose owner differs between two maps."""
    return sum(1 for a, b in zip(old.shards, new.shards, strict=True) if a != b)


def balance_problem(m: ShardMap) -> str | None:
    """Why ``m`` is not a balanced, complete assignment over its groups (None if it is)."""
    if not m.groups:
        return None if all(g == UNASSIGNED for g in m.shards) else f"map {m.num}: shards owned with no groups"
    strays = sorted({g for g in m.shards if g not in m.groups})
    if strays:
        return f"map {m.num}: shards owned by {strays}, not live groups {sorted(m.groups)}"
    counts = Counter({gid: 0 for gid in m.groups})
    counts.update(m.shards)
    if max(counts.values()) - min(counts.values()) > 1:
        return f"map {m.num}: unbalanced counts {dict(sorted(counts.items()))}"
    return None


def sleep(clock: Any, seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    clock.callLater(seconds, d.callback, None)
    return d


class ShardMasterCase(SimGroupTestCase):
    """Helpers: a group torn down at the end, clients, and waiting for answers."""

    def group(self, n: int = 3, seed: int = 0, **kwargs: Any) -> SimReplicaGroup:
        g = shardmaster_group(n, seed, **kwargs)
        self.addCleanup(g.stop_all)
        return g

    def client(
        self,
        g: SimReplicaGroup,
        name: str,
        *,
        addresses: Sequence[str] | None = None,
        timeout: float = 10.0,
        attempt_timeout: float = 1.0,
    ) -> ShardMasterClient:
        return ShardMasterClient(
            g.rpc.pool(name),
            list(addresses) if addresses is not None else [g.addresses[i] for i in g.ids],
            g.clock,
            client_id=name,
            timeout=timeout,
            attempt_timeout=attempt_timeout,
            rng=random.Random(f"{g.seed}:{name}"),
        )

    def all_settled(self, g: SimReplicaGroup, ds: Sequence[Deferred[Any]], within: float = 60.0) -> list[Any]:
        """Results of Deferreds that must all succeed."""
        if not g.settle(ds, within, STEP):
            self.fail(f"seed={g.seed}: {sum(not d.called for d in ds)} calls still pending after {within}s")
        results = []
        for d in ds:
            ok, value = resolve(d)
            if not ok:
                self.fail(f"seed={g.seed}: a concurrent call failed: {value!r}")
            results.append(value)
        return results

    def history(self, g: SimReplicaGroup, c: ShardMasterClient) -> list[ShardMap]:
        """Every map 0..latest, queried one by one through the client."""
        latest = self.value(g, c.query(-1))
        maps = [self.value(g, c.query(n)) for n in range(latest.num)] + [latest]
        for n, m in enumerate(maps):
            self.assertEqual(m.num, n, f"seed={g.seed}: query({n}) answered map {m.num}")
        return maps

    def assert_replicas_agree(self, g: SimReplicaGroup) -> None:
        """After converging, every replica's state machine is byte-identical."""
        g.converge()
        snapshots = {i: g.cluster.state_machines[i].snapshot() for i in g.ids}
        distinct = set(snapshots.values())
        if len(distinct) != 1:
            latest = {i: g.cluster.state_machines[i].latest.num for i in g.ids}
            self.fail(f"seed={g.seed}: replicas differ after converging; latest map numbers {latest}")

    def assert_balanced(self, g: SimReplicaGroup, m: ShardMap) -> None:
        problem = balance_problem(m)
        if problem is not None:
            self.fail(f"seed={g.seed}: {problem}: {m!r}")

    def assert_minimal(self, g: SimReplicaGroup, old: ShardMap, new: ShardMap) -> None:
        """The join or leave from ``old`` to ``new`` moved no more shards than
        balance needs (counted against ``rebalance.min_moves``, which is
        derived from counts alone)."""
        needed = rebalance.min_moves(old.shards, new.groups)
        self.assertEqual(
            moved(old, new),
            needed,
            f"seed={g.seed}: map {old.num} -> {new.num} moved {moved(old, new)} shards, balance needs {needed}",
        )


# ---------------------------------------------------------------------------
# The lab behaviours, end to end through the client
# ---------------------------------------------------------------------------


class LabBehaviourTests(ShardMasterCase):
    def test_basic_join_leave_query_sequence(self) -> None:
        g = self.group(3, seed=0)
        g.wait_for_leader()
        c = self.client(g, "admin")
        m0 = self.value(g, c.query(-1))
        self.assertEqual((m0.num, m0.shards, dict(m0.groups)), (0, (UNASSIGNED,) * NSHARDS, {}))

        self.assertEqual(self.value(g, c.join({1: addrs(1)})), 1)
        m1 = self.value(g, c.query(-1))
        self.assertEqual((m1.num, m1.shards, dict(m1.groups)), (1, (1,) * NSHARDS, {1: tuple(addrs(1))}))

        self.assertEqual(self.value(g, c.join({2: addrs(2)})), 2)
        m2 = self.value(g, c.query(-1))
        # Group 1 keeps its lowest-numbered half; group 2 takes the rest.
        self.assertEqual(m2.shards, (1,) * 5 + (2,) * 5)
        self.assertEqual(dict(m2.groups), {1: tuple(addrs(1)), 2: tuple(addrs(2))})
        self.assert_minimal(g, m1, m2)

        # Joining an existing group is refused and makes no map.
        error = self.error(g, c.join({2: addrs(9)}))
        self.assertIsInstance(error, BadRequest)
        self.assertIn("already exists", error.message)
        self.assertEqual(self.value(g, c.query(-1)), m2)

        self.assertEqual(self.value(g, c.leave([1])), 3)
        m3 = self.value(g, c.query(-1))
        self.assertEqual((m3.shards, dict(m3.groups)), ((2,) * NSHARDS, {2: tuple(addrs(2))}))

        # Rejoining a group that left is a new join.
        self.assertEqual(self.value(g, c.join({1: addrs(1)})), 4)
        m4 = self.value(g, c.query(-1))
        self.assert_balanced(g, m4)
        self.assert_minimal(g, m3, m4)

        # The last groups may not leave: their shards' data would have no owner.
        refused = self.error(g, c.leave([1, 2]))
        self.assertIsInstance(refused, BadRequest)
        self.assertEqual(self.value(g, c.query(-1)), m4)
        self.assert_replicas_agree(g)

    def test_historical_queries_return_the_old_maps(self) -> None:
        g = self.group(3, seed=1)
        g.wait_for_leader()
        c = self.client(g, "admin")
        seen = [self.value(g, c.query(-1))]
        for op in (
            lambda: c.join({1: addrs(1)}),
            lambda: c.join({2: addrs(2), 3: addrs(3)}),
            lambda: c.move(0, 3),
            lambda: c.leave([2]),
            lambda: c.join({4: addrs(4)}),
            lambda: c.leave([1, 3]),
        ):
            num = self.value(g, op())
            seen.append(self.value(g, c.query(-1)))
            self.assertEqual(seen[-1].num, num)
        # Another client, after a leadership change, sees the same history.
        old_leader = g.cluster.leader()
        target = next(i for i in g.ids if i != old_leader)
        self.assertTrue(
            self.value(g, g.rpc.pool("op").call(g.addresses[target], "set_leader", {"timeout": 5.0}, 6.0))
        )
        self.assertEqual(g.cluster.leader(), target)
        other = self.client(g, "auditor")
        self.assertEqual(self.history(g, other), seen)
        # A number beyond the latest answers the latest (documented); below -1 is refused.
        self.assertEqual(self.value(g, other.query(1000)), seen[-1])
        error = self.error(g, other.query(-2))
        self.assertIsInstance(error, BadRequest)
        self.assertIn(">= 0", error.message)

    def test_moves_hold_until_the_next_rebalance(self) -> None:
        g = self.group(3, seed=2)
        g.wait_for_leader()
        c = self.client(g, "admin")
        self.value(g, c.join({3: addrs(3)}))
        self.value(g, c.join({4: addrs(4)}))
        before = self.value(g, c.query(-1))
        self.assertEqual(before.shards, (3,) * 5 + (4,) * 5)
        # Swap the halves shard by shard; every move makes exactly one new map,
        # even one that changes nothing.
        for shard in range(NSHARDS):
            target = 4 if shard < NSHARDS // 2 else 3
            num = self.value(g, c.move(shard, target))
            self.assertEqual(num, before.num + 1 + shard)
            self.assertEqual(self.value(g, c.query(-1)).group_of_shard(shard), target)
        self.assertEqual(self.value(g, c.move(0, 4)), before.num + NSHARDS + 1)
        swapped = self.value(g, c.query(-1))
        self.assertEqual(swapped.shards, (4,) * 5 + (3,) * 5)
        # Pile everything on group 3: unbalanced, and it stays so...
        for shard in range(NSHARDS // 2):
            self.value(g, c.move(shard, 3))
        piled = self.value(g, c.query(-1))
        self.assertEqual(piled.shards, (3,) * NSHARDS)
        g.run(2.0, STEP)
        leader = g.cluster.leader()
        g.restart(leader)  # ...across a leader's death and a new leader
        g.wait_for_leader()
        self.assertEqual(self.value(g, c.query(-1)), piled)
        # ...until the next join, which rebalances from the moved map, minimally.
        self.value(g, c.join({5: addrs(5)}))
        joined = self.value(g, c.query(-1))
        self.assert_balanced(g, joined)
        self.assert_minimal(g, piled, joined)
        self.assertEqual(set(joined.shards), {3, 4, 5})
        # A leave rebalances too.
        self.value(g, c.leave([3]))
        left = self.value(g, c.query(-1))
        self.assert_balanced(g, left)
        self.assert_minimal(g, joined, left)
        self.assert_replicas_agree(g)

    def test_concurrent_joins_and_leaves_from_many_clients(self) -> None:
        """The lab's concurrent leave/join: ten clients each join gid+1000,
        join gid, leave gid+1000, all at once, over an RPC layer that drops
        requests and replies (so retries hit the dedup table)."""
        g = self.group(3, seed=3)
        g.wait_for_leader()
        g.rpc.set_faults(drop_request=0.1, drop_reply=0.1)
        gids = [100 + 10 * i for i in range(10)]

        @defer.inlineCallbacks
        def admin(i: int) -> Generator[Deferred[Any], Any, list[int]]:
            c = self.client(g, f"admin-{i}", timeout=30.0, attempt_timeout=0.5)
            gid = gids[i]
            a = yield c.join({gid + 1000: [f"s{gid}a.sim:1"]})
            b = yield c.join({gid: [f"s{gid}b.sim:1"]})
            d = yield c.leave([gid + 1000])
            return [a, b, d]

        numbers = self.all_settled(g, [admin(i) for i in range(len(gids))])
        self.assertGreater(g.rpc.replies_dropped + g.rpc.requests_dropped, 0, "no fault was injected")
        # 30 writes, each applied exactly once: maps 1..30, each number once.
        self.assertEqual(sorted(n for ns in numbers for n in ns), list(range(1, 31)), f"seed={g.seed}")
        for ns in numbers:
            self.assertEqual(ns, sorted(ns), f"seed={g.seed}: one client's writes out of order")
        g.rpc.set_faults(drop_request=0.0, drop_reply=0.0)
        c = self.client(g, "auditor")
        maps = self.history(g, c)
        self.assertEqual(maps[-1].num, 30)
        self.assertEqual(sorted(maps[-1].groups), gids)
        self.assert_balanced(g, maps[-1])
        joins: Counter[int] = Counter()
        leaves: Counter[int] = Counter()
        for old, new in itertools.pairwise(maps):
            joins.update(set(new.groups) - set(old.groups))
            leaves.update(set(old.groups) - set(new.groups))
            self.assert_balanced(g, new)
            self.assert_minimal(g, old, new)
        self.assertEqual(joins, Counter(gids + [gid + 1000 for gid in gids]))
        self.assertEqual(leaves, Counter(gid + 1000 for gid in gids))
        self.assert_replicas_agree(g)

    def test_minimal_transfers_after_joins_and_after_leaves(self) -> None:
        g = self.group(3, seed=4)
        g.wait_for_leader()
        c = self.client(g, "admin")
        for gid in (1, 2, 3):
            self.value(g, c.join({gid: addrs(gid)}))
        start = self.value(g, c.query(-1))
        previous = start
        for gid in range(4, 9):
            self.value(g, c.join({gid: addrs(gid)}))
            current = self.value(g, c.query(-1))
            self.assert_balanced(g, current)
            self.assert_minimal(g, previous, current)
            # The lab's check: after joins, old groups gain no shards.
            for shard, owner in enumerate(current.shards):
                if owner in start.groups:
                    self.assertEqual(start.shards[shard], owner, f"group {owner} gained shard {shard}")
            self.assertGreater(moved(previous, current), 0)
            previous = current
        after_joins = previous
        for gid in range(4, 9):
            self.value(g, c.leave([gid]))
            current = self.value(g, c.query(-1))
            self.assert_balanced(g, current)
            self.assert_minimal(g, previous, current)
            # After leaves, the staying groups lose no shards, and only the
            # leaving group's shards move.
            for shard, owner in enumerate(after_joins.shards):
                if owner in current.groups:
                    self.assertEqual(current.shards[shard], owner, f"group {owner} lost shard {shard}")
            self.assertEqual(moved(previous, current), len(previous.shards_of(gid)))
            previous = current

    def test_many_groups_join_and_leave_at_once(self) -> None:
        g = self.group(3, seed=5)
        g.wait_for_leader()
        c = self.client(g, "admin")
        m0 = self.value(g, c.query(-1))
        self.assertEqual(self.value(g, c.join({gid: addrs(gid) for gid in (1, 2, 3)})), 1)
        m1 = self.value(g, c.query(-1))
        self.assertEqual(sorted(m1.groups), [1, 2, 3])
        self.assert_balanced(g, m1)
        self.assert_minimal(g, m0, m1)
        # Concurrent multi-joins and multi-leaves (the lab's multijoin/leave).
        ds = []
        for i in range(10):
            gid = 10 + i

            @defer.inlineCallbacks
            def admin(i: int = i, gid: int = gid) -> Generator[Deferred[Any], Any, None]:
                sub = self.client(g, f"multi-{i}")
                yield sub.join(
                    {gid: addrs(gid), gid + 1000: addrs(gid + 1000), gid + 2000: addrs(gid + 2000)}
                )
                yield sub.leave([gid + 1000, gid + 2000])

            ds.append(admin())
        self.all_settled(g, ds)
        m = self.value(g, c.query(-1))
        self.assertEqual(m.num, 1 + 20)
        self.assertEqual(sorted(m.groups), [1, 2, 3, *range(10, 20)])
        self.assert_balanced(g, m)
        # Minimal transfers after one multi-join, and after one multi-leave.
        num = self.value(g, c.join({gid: addrs(gid) for gid in range(50, 55)}))
        joined = self.value(g, c.query(-1))
        self.assertEqual(joined.num, num)
        self.assert_balanced(g, joined)
        self.assert_minimal(g, m, joined)
        for shard, owner in enumerate(joined.shards):
            if owner in m.groups:
                self.assertEqual(m.shards[shard], owner)
        self.value(g, c.leave(list(range(50, 55)) + [1, 2]))
        left = self.value(g, c.query(-1))
        self.assertEqual(sorted(left.groups), [3, *range(10, 20)])
        self.assert_balanced(g, left)
        self.assert_minimal(g, joined, left)
        for shard, owner in enumerate(joined.shards):
            if owner in left.groups:
                self.assertEqual(left.shards[shard], owner)
        self.assert_replicas_agree(g)

    def test_more_groups_than_shards(self) -> None:
        g = self.group(3, seed=6, nshards=4)
        g.wait_for_leader()
        c = self.client(g, "admin")
        self.value(g, c.join({gid: addrs(gid) for gid in range(1, 5)}))
        self.value(g, c.join({gid: addrs(gid) for gid in range(5, 9)}))
        for gid in range(9, 13):
            self.value(g, c.join({gid: addrs(gid)}))
        m = self.value(g, c.query(-1))
        self.assertEqual(len(m.groups), 12)
        self.assert_balanced(g, m)
        # Four shards, twelve groups: four groups own one each, the rest idle.
        self.assertEqual(sorted(Counter(m.shards).values()), [1, 1, 1, 1])
        self.assertNotIn(UNASSIGNED, m.shards)
        # Idle groups leaving move nothing.
        idle = sorted(set(m.groups) - set(m.shards))
        self.value(g, c.leave(idle[:3]))
        after_idle = self.value(g, c.query(-1))
        self.assertEqual(after_idle.shards, m.shards)
        # Owners leaving: exactly their shards move, to groups still live.
        owners = sorted(set(after_idle.shards))[:2]
        self.value(g, c.leave(owners))
        after = self.value(g, c.query(-1))
        self.assert_balanced(g, after)
        self.assertEqual(moved(after_idle, after), 2)
        self.assert_minimal(g, after_idle, after)
        # Everyone leaving is refused; all but one leaving gives it every shard.
        self.assertIsInstance(self.error(g, c.leave(sorted(after.groups))), BadRequest)
        self.value(g, c.leave(sorted(after.groups)[1:]))
        self.assertEqual(self.value(g, c.query(-1)).shards, (min(after.groups),) * 4)
        self.assert_replicas_agree(g)


# ---------------------------------------------------------------------------
# Bad input through the real method table
# ---------------------------------------------------------------------------


class NextMapWatchTests(ShardMasterCase):
    def test_a_query_for_the_next_map_waits_for_it(self) -> None:
        g = self.group(3, seed=11)
        leader = g.wait_for_leader()
        c = self.client(g, "admin")
        self.value(g, c.join({1: addrs(1)}))
        pool = g.rpc.pool("watcher")
        address = g.addresses[leader]
        # Nothing new: the answer is the latest map, once ``wait`` is over.
        start = g.clock.seconds()
        answer = self.value(g, pool.call(address, "query", {"num": 2, "wait": 0.5}, 5.0))
        self.assertEqual(answer["num"], 1)
        self.assertGreaterEqual(g.clock.seconds() - start, 0.5)
        # A map made meanwhile answers at once, not at the end of ``wait``.
        waiting = pool.call(address, "query", {"num": 2, "wait": 20.0}, 25.0)
        g.run(0.3)
        self.assertFalse(waiting.called)
        start = g.clock.seconds()
        self.value(g, c.join({2: addrs(2)}))
        answer = self.value(g, waiting)
        self.assertEqual(answer["num"], 2)
        self.assertLess(g.clock.seconds() - start, 1.0)
        # A map that exists already needs no wait.
        start = g.clock.seconds()
        self.assertEqual(self.value(g, pool.call(address, "query", {"num": 1, "wait": 20.0}, 25.0))["num"], 1)
        self.assertLess(g.clock.seconds() - start, 1.0)


class BadInputTests(ShardMasterCase):
    def test_bad_writes_are_refused_with_a_clear_error_and_no_new_map(self) -> None:
        g = self.group(3, seed=7)
        leader = g.wait_for_leader()
        c = self.client(g, "admin")
        self.value(g, c.join({1: addrs(1), 2: addrs(2)}))
        before = self.value(g, c.query(-1))
        pool = g.rpc.pool("raw")
        address = g.addresses[leader]
        ids = itertools.count(1)

        def call(method: str, args: dict[str, Any]) -> Deferred[Any]:
            # With and without dedup ids: both paths must validate.
            if method != "query" and next(ids) % 2:
                args = dict(args, client_id="raw", seq=next(ids))
            return pool.call(address, method, args, 2.0)

        cases: list[tuple[str, dict[str, Any], str]] = [
            ("leave", {"gids": [99]}, "group 99 is unknown"),
            ("leave", {"gids": [1, 99]}, "group 99 is unknown"),
            ("leave", {"gids": [0]}, "reserved"),
            ("leave", {"gids": [-3]}, "gid must be in"),
            ("leave", {"gids": []}, "gids"),
            ("leave", {"gids": [1, 1]}, "twice"),
            ("leave", {"gids": ["1"]}, "expected int, got str"),
            ("leave", {"gids": [True]}, "expected int, got bool"),
            ("move", {"shard": 0, "gid": 99}, "group 99 is unknown"),
            ("move", {"shard": -1, "gid": 1}, "shard -1 is out of range"),
            ("move", {"shard": NSHARDS, "gid": 1}, f"shard {NSHARDS} is out of range"),
            ("move", {"shard": 1 << 40, "gid": 1}, "out of range"),
            ("move", {"shard": 0, "gid": 0}, "reserved"),
            ("move", {"shard": 0, "gid": "1"}, "expected int, got str"),
            ("move", {"shard": "0", "gid": 1}, "expected int, got str"),
            ("move", {"shard": 0}, "gid: is required"),
            ("join", {"groups": {3: []}}, "groups[3]"),
            ("join", {"groups": {}}, "groups"),
            ("join", {"groups": {3: ["no-port"]}}, "malformed address"),
            ("join", {"groups": {3: ["host:0"]}}, "malformed address"),
            ("join", {"groups": {3: ["host:99999"]}}, "malformed address"),
            ("join", {"groups": {3: [":7000"]}}, "malformed address"),
            ("join", {"groups": {3: ["bad host!:7000"]}}, "malformed address"),
            ("join", {"groups": {3: [""]}}, "groups[3][0]"),
            ("join", {"groups": {3: "g3.sim:1"}}, "expected list, got str"),
            ("join", {"groups": {0: addrs(3)}}, "reserved"),
            ("join", {"groups": {-5: addrs(3)}}, "gid must be in"),
            ("join", {"groups": {1 << 63: addrs(3)}}, "gid must be in"),
            ("join", {"groups": {"3": addrs(3)}}, "expected int, got str"),
            ("join", {"groups": {1: addrs(3)}}, "group 1 already exists"),
            ("join", {"groups": {3: addrs(3) + addrs(3)[:1]}}, "twice"),
            ("join", {"groups": {3: addrs(1)[:1]}}, "already in group 1"),
            ("join", {"groups": {3: ["a.sim:1"], 4: ["a.sim:1"]}}, "a.sim:1"),
            ("join", {"groups": {3: addrs(3)}, "extra": 1}, "unknown field"),
            ("query", {"num": -2}, ">= 0"),
            ("query", {"num": "latest"}, "expected int, got str"),
            ("query", {"num": 5, "wait": -1.0}, "wait"),
            ("query", {"num": 5, "wait": 31.0}, "wait"),
            ("query", {"num": 5, "wait": "soon"}, "wait"),
        ]
        for method, args, expected in cases:
            error = self.error(g, call(method, args), within=3.0)
            self.assertIsInstance(error, BadRequest, (method, args))
            self.assertIn(expected, error.message, (method, args))
        # Bad dedup identities are refused too.
        for ident in ({"client_id": "", "seq": 1}, {"client_id": "x", "seq": 0}):
            error = self.error(g, pool.call(address, "leave", {"gids": [1], **ident}, 2.0))
            self.assertIsInstance(error, BadRequest, ident)
        # The client library gets the same refusals at once (no retries).
        for op in (lambda: c.leave([99]), lambda: c.move(NSHARDS, 1), lambda: c.join({5: []})):
            start = g.clock.seconds()
            self.assertIsInstance(self.error(g, op()), BadRequest)
            self.assertLess(g.clock.seconds() - start, 0.5)
        # Nothing changed anywhere: same latest map on the leader, the client
        # and every replica, and the replicas still agree.
        self.assertEqual(self.value(g, c.query(-1)), before)
        g.run(0.5, STEP)
        for i in g.ids:
            self.assertEqual(g.cluster.state_machines[i].latest, before, f"replica {i}")
        self.assert_replicas_agree(g)

    def test_concurrent_joins_of_one_gid_admit_exactly_one(self) -> None:
        """Two admins joining the same gid at once: the state machine refuses
        the second at apply time (the leader's pre-check could not know)."""
        g = self.group(3, seed=8)
        g.wait_for_leader()
        first, second = self.client(g, "first"), self.client(g, "second")
        d1 = first.join({7: addrs(7)})
        d2 = second.join({7: ["other.sim:1"]})
        g.settle([d1, d2], 10.0, STEP)
        outcomes = [resolve(d1), resolve(d2)]
        self.assertEqual(sorted(ok for ok, _ in outcomes), [False, True], outcomes)
        error = next(v for ok, v in outcomes if not ok)
        self.assertIsInstance(error, BadRequest)
        self.assertIn("already exists", error.message)
        latest = self.value(g, first.query(-1))
        self.assertEqual(latest.num, 1)
        self.assertIn(latest.groups[7], (tuple(addrs(7)), ("other.sim:1",)))
        self.assert_replicas_agree(g)


# ---------------------------------------------------------------------------
# A deposed leader
# ---------------------------------------------------------------------------


class DeposedLeaderTests(ShardMasterCase):
    def deposed(self, seed: int, check_quorum: bool) -> tuple[SimReplicaGroup, int, ShardMap]:
        """A group whose leader L is cut off from the other replicas after map
        1, while the majority (reached by an admin who knows only them) makes
        map 2. Clients still reach L."""
        g = self.group(3, seed, config_overrides={"check_quorum": check_quorum})
        old = g.wait_for_leader()
        c = self.client(g, "admin")
        self.assertEqual(self.value(g, c.join({1: addrs(1)})), 1)
        g.run(0.5, STEP)  # every replica applied map 1
        rest = [i for i in g.ids if i != old]
        g.partition([old], rest)
        majority = self.client(g, "majority-admin", addresses=[g.addresses[i] for i in rest])
        self.assertEqual(self.value(g, majority.join({2: addrs(2)})), 2)
        new = self.value(g, majority.query(-1))
        self.assertEqual(new.num, 2)
        # L still holds the stale map, so a stale answer is possible at all.
        self.assertEqual(g.cluster.state_machines[old].latest.num, 1, f"seed={seed}")
        return g, old, new

    def test_deposed_leader_never_answers_a_query_with_a_stale_map(self) -> None:
        for seed in sim_seeds(2):
            for check_quorum in (False, True):
                g, old, new = self.deposed(seed, check_quorum)
                where = f"seed={seed} check_quorum={check_quorum}"
                if not check_quorum:
                    # Without check-quorum L never steps down by itself.
                    self.assertTrue(g.node(old).is_leader, where)
                pool = g.rpc.pool("probe")
                for num in (-1, 2, 5):
                    ok, answer = self.outcome(
                        g, pool.call(g.addresses[old], "query", {"num": num, "timeout": 2.0}, 3.0), 4.0
                    )
                    if ok:
                        self.assertGreaterEqual(answer["num"], new.num, f"{where}: stale map {answer!r}")
                    else:
                        self.assertIsInstance(answer, (Timeout, NotLeader), where)
                # A client that still believes in L finds the new map.
                c = self.client(g, "believer")
                c.caller.leader = g.addresses[old]
                self.assertEqual(self.value(g, c.query(-1)), new, where)
                # Healed, L catches up and every replica agrees.
                g.heal()
                self.assert_replicas_agree(g)

    def test_deposed_leader_never_refuses_a_write_from_its_stale_map(self) -> None:
        """Group 2 exists (map 2) but L's stale map lacks it: L must not answer
        "unknown group"; the client, retrying elsewhere, gets the leave done."""
        for seed in sim_seeds(2):
            g, old, new = self.deposed(seed, check_quorum=False)
            where = f"seed={seed}"
            pool = g.rpc.pool("probe")
            for method, args in [
                ("leave", {"gids": [2], "client_id": "probe", "seq": 1, "timeout": 1.0}),
                ("move", {"shard": 0, "gid": 2, "client_id": "probe", "seq": 2, "timeout": 1.0}),
            ]:
                error = self.error(g, pool.call(g.addresses[old], method, args, 2.0), 3.0)
                self.assertFalse(
                    isinstance(error, BadRequest), f"{where}: {method} refused from a stale map: {error!r}"
                )
                self.assertIsInstance(error, (Timeout, NotLeader), where)
            c = self.client(g, "believer")
            c.caller.leader = g.addresses[old]
            num = self.value(g, c.leave([2]))
            self.assertGreater(num, new.num, where)
            self.assertEqual(sorted(self.value(g, c.query(-1)).groups), [1], where)
            self.assert_replicas_agree(g)


# ---------------------------------------------------------------------------
# One linear history under faults
# ---------------------------------------------------------------------------


@dataclass(eq=False)
class Op:
    """One admin call and what came of it. ``invoked``/``completed`` are
    positions in one global event order (simulated time alone cannot order
    two events of the same clock step)."""

    client: int
    kind: str  # join | leave | move | query
    args: Any
    invoked: int
    completed: int | None = None
    #: ok | unknown | refused | refused_last (a leave of the last groups) | error | pending
    outcome: str = "pending"
    result: Any = None
    #: For a write: the map number it created (acknowledged, or matched by the check).
    num: int | None = None

    @property
    def is_write(self) -> bool:
        return self.kind != "query"

    def __repr__(self) -> str:
        result = (
            f"map {self.result.num}" if self.kind == "query" and self.outcome == "ok" else repr(self.result)
        )
        return f"<client {self.client} {self.kind}{self.args!r} {self.outcome} -> {result} @{self.invoked}..{self.completed}>"


def explains(op: Op, old: ShardMap, new: ShardMap) -> bool:
    """Whether ``new`` is ``old`` changed by ``op`` and nothing else: the
    groups change exactly as the op says, a join or leave leaves the map
    balanced with the fewest moves, a move changes exactly its shard."""
    if new.num != old.num + 1:
        return False
    if op.kind == "move":
        shard, gid = op.args
        want = list(old.shards)
        want[shard] = gid
        return new.groups == old.groups and new.shards == tuple(want)
    if op.kind == "join":
        joining: Mapping[int, Sequence[str]] = op.args
        if any(gid in old.groups for gid in joining):
            return False
        groups = {**old.groups, **{gid: tuple(a) for gid, a in joining.items()}}
    else:
        leaving: Sequence[int] = op.args
        if any(gid not in old.groups for gid in leaving):
            return False
        groups = {gid: a for gid, a in old.groups.items() if gid not in leaving}
    return (
        dict(new.groups) == groups
        and balance_problem(new) is None
        and moved(old, new) == rebalance.min_moves(old.shards, groups)
    )


class HistoryCheck:
    """Checks that a run's operations form one linear history of maps.

    ``maps`` is the converged history (map n at index n); ``ops`` every call
    made. ``problems`` collects what is wrong (empty: the history is good).
    """

    def __init__(self, maps: Sequence[ShardMap], ops: Sequence[Op]) -> None:
        self.maps = maps
        self.ops = ops
        self.problems: list[str] = []

    def run(self) -> list[str]:
        self._numbers_have_no_gaps()
        if not self.problems:
            self._acknowledged_writes()
            self._unclaimed_maps_match_unknown_writes()
            self._client_order()
            self._real_time_order()
            self._queries_match_the_history()
            self._refused_leaves_were_of_the_last_groups()
        return self.problems

    def _numbers_have_no_gaps(self) -> None:
        for n, m in enumerate(self.maps):
            if m.num != n:
                self.problems.append(f"history position {n} holds map {m.num}")
                return

    def _acknowledged_writes(self) -> None:
        """Each acknowledged write created exactly the map number it was told."""
        claimed: dict[int, Op] = {}
        for op in self.ops:
            if not (op.is_write and op.outcome == "ok"):
                continue
            n = op.result
            if not 1 <= n < len(self.maps):
                self.problems.append(f"{op!r} was acknowledged with map {n}, which does not exist")
                continue
            if n in claimed:
                self.problems.append(f"{op!r} and {claimed[n]!r} were both acknowledged with map {n}")
                continue
            if not explains(op, self.maps[n - 1], self.maps[n]):
                self.problems.append(f"{op!r} does not explain map {n - 1} -> {n}: {self.maps[n]!r}")
                continue
            claimed[n] = op
            op.num = n
        self.claimed = claimed

    def _unclaimed_maps_match_unknown_writes(self) -> None:
        """Every other map is explained by a distinct unknown-outcome write
        that was invoked before the map could have been made (bipartite
        matching, since two unknown writes might explain the same change)."""
        unknown = [op for op in self.ops if op.is_write and op.outcome == "unknown"]
        floors = {id(op): self._floor(op) for op in unknown}
        ceilings = {id(op): self._ceiling(op) for op in unknown}
        candidates: dict[int, list[Op]] = {}
        for n in range(1, len(self.maps)):
            if n in self.claimed:
                continue
            candidates[n] = [
                op
                for op in unknown
                if floors[id(op)] < n < ceilings[id(op)] and explains(op, self.maps[n - 1], self.maps[n])
            ]
        owner: dict[int, int] = {}  # id(op) -> map number

        def augment(n: int, seen: set[int]) -> bool:
            for op in candidates[n]:
                key = id(op)
                if key in seen:
                    continue
                seen.add(key)
                if key not in owner or augment(owner[key], seen):
                    owner[key] = n
                    return True
            return False

        for n in candidates:
            if not augment(n, set()):
                self.problems.append(
                    f"map {n} is not explained by any acknowledged or unknown-outcome operation: "
                    f"{self.maps[n - 1]!r} -> {self.maps[n]!r}"
                )
        for op in unknown:
            if id(op) in owner:
                op.num = owner[id(op)]

    def _floor(self, op: Op) -> int:
        """Every op completed before ``op`` was invoked saw a map ``op`` came after."""
        seen = [o.num if o.is_write else o.result.num for o in self._linearized() if o.completed < op.invoked]
        return max(seen, default=0)

    def _ceiling(self, op: Op) -> int:
        """An unknown write of a client precedes that client's next
        acknowledged write, or never applies (a lower sequence number is
        refused as stale)."""
        later = [
            o.result
            for o in self.ops
            if o.client == op.client and o.is_write and o.outcome == "ok" and o.invoked > op.invoked
        ]
        return min(later, default=len(self.maps))

    def _linearized(self) -> list[Op]:
        return [
            o for o in self.ops if o.outcome == "ok" and (o.num is not None if o.is_write else o.args == -1)
        ]

    def _client_order(self) -> None:
        """Each client's writes took effect in the order it made them, and
        its reads never went back in time. An unknown-outcome write bounds
        the client's later writes only: it may still apply after a later read."""
        clients = sorted({op.client for op in self.ops})
        for client in clients:
            observed, observed_op = 0, None  # newest map it was told of
            written, written_op = 0, None  # newest map one of its writes made
            for op in sorted((o for o in self.ops if o.client == client), key=lambda o: o.invoked):
                if op.is_write and op.num is not None:
                    if op.num <= max(observed, written):
                        before = observed_op if observed >= written else written_op
                        self.problems.append(f"{op!r} took effect at map {op.num}, not after {before!r}")
                    written, written_op = op.num, op
                    if op.outcome == "ok":
                        observed, observed_op = max(observed, op.num), op
                elif op.kind == "query" and op.outcome == "ok" and op.args == -1:
                    if op.result.num < observed:
                        self.problems.append(
                            f"{op!r} went back in time from map {observed} ({observed_op!r})"
                        )
                    observed, observed_op = max(observed, op.result.num), op

    def _real_time_order(self) -> None:
        """Linearizability of the whole history: an op invoked after another
        completed comes after it (strictly, if it is a write)."""
        done = sorted((o for o in self._linearized()), key=lambda o: o.completed)
        best, best_op, k = 0, None, 0
        for op in sorted((o for o in self._linearized()), key=lambda o: o.invoked):
            while k < len(done) and done[k].completed < op.invoked:
                value = done[k].num if done[k].is_write else done[k].result.num
                if value >= best:
                    best, best_op = value, done[k]
                k += 1
            value = op.num if op.is_write else op.result.num
            if (op.is_write and value <= best and best_op is not None) or value < best:
                self.problems.append(
                    f"{op!r} (map {value}) is ordered before {best_op!r}, which completed first"
                )
        for op in self.ops:
            if op.is_write and op.outcome == "unknown" and op.num is not None and op.num <= self._floor(op):
                self.problems.append(f"{op!r} matched map {op.num}, before it was invoked")

    def _refused_leaves_were_of_the_last_groups(self) -> None:
        """A leave refused for taking the last groups was made while those
        were the only groups: some map between the newest one seen before it
        was invoked and the newest one made by a write invoked before it
        completed holds no other group."""
        for op in self.ops:
            if op.outcome != "refused_last":
                continue
            assert op.completed is not None
            floor = self._floor(op)
            ceiling = max(
                (o.num for o in self.ops if o.is_write and o.num is not None and o.invoked < op.completed),
                default=0,
            )
            window = self.maps[floor : max(floor, ceiling) + 1]
            if not any(m.groups and set(m.groups) <= set(op.args) for m in window):
                self.problems.append(
                    f"{op!r} was refused as a leave of the last groups, but maps {floor}..{ceiling} "
                    "all hold other groups"
                )

    def _queries_match_the_history(self) -> None:
        for op in self.ops:
            if op.kind == "query" and op.outcome == "ok":
                m = op.result
                if not 0 <= m.num < len(self.maps) or self.maps[m.num] != m:
                    self.problems.append(f"{op!r} answered {m!r}, not the history's map {m.num}")
                elif op.args != -1 and m.num != op.args:
                    self.problems.append(f"{op!r} asked for map {op.args}")


#: What the ShardMaster answers to a leave of every group left (shardmaster.state).
LAST_GROUPS_REFUSED = "would leave no group to hold the shards' data"


class AdminWorkload:
    """Concurrent admin clients and a nemesis against one SimReplicaGroup.

    Each client runs sequentially (one call at a time, as an operator does),
    joins fresh groups of its own, moves shards to and leaves only groups it
    knows it joined, and queries the latest or an older map. Its writes'
    outcomes are acknowledged, refused (a bug in this workload: every call is
    valid when made) or unknown (timed out through a fault).
    """

    #: Client call deadlines, cycled over the clients: the short ones give
    #: up during longer faults, so some writes end with an unknown outcome.
    TIMEOUTS = (6.0, 1.0, 6.0, 1.5, 2.5)

    def __init__(self, g: SimReplicaGroup, nclients: int) -> None:
        self.g = g
        self.seed = g.seed
        self.events = itertools.count()
        self.ops: list[Op] = []
        self.stop_at = float("inf")
        self.clients = []
        for k in range(nclients):
            timeout = self.TIMEOUTS[k % len(self.TIMEOUTS)]
            self.clients.append(
                ShardMasterClient(
                    g.rpc.pool(f"admin-{k}"),
                    [g.addresses[i] for i in g.ids],
                    g.clock,
                    client_id=f"admin-{k}",
                    timeout=timeout,
                    attempt_timeout=min(0.8, timeout / 2),
                    rng=random.Random(f"sm-client-rng:{g.seed}:{k}"),
                )
            )

    def start(self, duration: float) -> list[Deferred[None]]:
        self.stop_at = self.g.clock.seconds() + duration
        return [self._client(k) for k in range(len(self.clients))]

    def _choose(
        self, k: int, rng: random.Random, live: list[int], next_gid: Callable[[], int], seen: int
    ) -> Op:
        """The next call of client ``k``: valid when made, given what it knows."""
        # Client 0 only reads, like a replica group polling for the latest
        # map: it sticks to whichever replica answers it, deposed or not.
        roll = 1.0 if k == 0 else rng.random()
        if roll < 0.25 or not live and roll < 0.6:
            joining = {
                gid: addrs(gid, rng.randint(1, 3))
                for gid in (next_gid() for _ in range(rng.choice((1, 1, 2))))
            }
            return Op(k, "join", joining, -1)
        if roll < 0.4 and live:
            leaving = rng.sample(live, min(len(live), rng.choice((1, 1, 2))))
            return Op(k, "leave", sorted(leaving), -1)
        if roll < 0.65 and live:
            return Op(k, "move", (rng.randrange(NSHARDS), rng.choice(live)), -1)
        num = -1 if rng.random() < 0.75 else rng.randint(0, seen)
        return Op(k, "query", num, -1)

    @defer.inlineCallbacks
    def _client(self, k: int) -> Generator[Deferred[Any], Any, None]:
        c = self.clients[k]
        rng = random.Random(f"sm-client:{self.seed}:{k}")
        gids = itertools.count((k + 1) * 1000)
        live: list[int] = []  # joined (acknowledged), not being left
        seen = 0  # newest map number this client knows of
        # Bounded: the loop stops issuing at stop_at, and every call ends
        # within the client's timeout.
        while self.g.clock.seconds() < self.stop_at:
            op = self._choose(k, rng, live, lambda: next(gids), seen)
            if op.kind == "leave":
                live = [gid for gid in live if gid not in op.args]
            op.invoked = next(self.events)
            self.ops.append(op)
            try:
                if op.kind == "join":
                    result = yield c.join(op.args)
                elif op.kind == "leave":
                    result = yield c.leave(op.args)
                elif op.kind == "move":
                    result = yield c.move(*op.args)
                else:
                    result = yield c.query(op.args)
            except BadRequest as e:
                if op.kind == "leave" and LAST_GROUPS_REFUSED in str(e):
                    # Valid when made as far as this client knew: the other
                    # clients' groups left meanwhile, and the ShardMaster
                    # keeps the last groups (their shards would have no
                    # owner). They are still joined; the check holds the
                    # refusal to a map where they were the only groups.
                    op.outcome, op.result = "refused_last", e
                    live.extend(op.args)
                else:
                    op.outcome, op.result = "refused", e
            except UNKNOWN_OUTCOME as e:
                op.outcome, op.result = "unknown", e
            except Exception as e:
                op.outcome, op.result = "error", e
            else:
                op.outcome, op.result = "ok", result
                seen = max(seen, result.num if op.kind == "query" else result)
                if op.kind == "join":
                    live.extend(op.args)
            op.completed = next(self.events)
            yield sleep(self.g.clock, rng.uniform(0.0, 0.15))


class Nemesis:
    """Seeded faults on the replicas: simulated crashes, process deaths
    (restarts from storage), isolating the leader, random partitions."""

    def __init__(self, g: SimReplicaGroup) -> None:
        self.g = g
        self.rng = random.Random(f"sm-nemesis:{g.seed}")
        self.crashed: set[int] = set()
        self.stopped: set[int] = set()
        self.partitioned = False
        self.actions: Counter[str] = Counter()

    def step(self) -> None:
        """One fault or one repair. With no leader (a majority down or cut
        off) a repair is likely, so outages are short and the run progresses."""
        g, rng = self.g, self.rng
        faulty = len(self.crashed) + len(self.stopped)
        leader = g.cluster.leader()
        if (faulty or self.partitioned) and rng.random() < (0.8 if leader is None else 0.4):
            self._repair()
            return
        healthy = [i for i in g.ids if i not in self.crashed and i not in self.stopped]
        # Usually keep a majority running; now and then one more goes down,
        # so writes time out with an unknown outcome.
        limit = (len(g.ids) - 1) // 2 + (1 if rng.random() < 0.15 else 0)
        actions = ["partition"]
        if faulty < limit:
            actions += ["crash", "stop"]
        if leader is not None:
            actions.append("isolate-leader")
        action = rng.choice(actions)
        if action == "crash":
            i = rng.choice(healthy)
            g.crash(i)
            self.crashed.add(i)
        elif action == "stop":
            i = rng.choice(healthy)
            g.stop(i)
            self.stopped.add(i)
        elif action == "isolate-leader":
            assert leader is not None
            g.isolate(leader)
            self.partitioned = True
        else:
            ids = list(g.ids)
            rng.shuffle(ids)
            cut = rng.randint(1, len(ids) - 1)
            g.partition(ids[:cut], ids[cut:])
            self.partitioned = True
        self.actions[action] += 1

    def _repair(self) -> None:
        g, rng = self.g, self.rng
        choices = sorted(self.crashed) + sorted(self.stopped) + ([0] if self.partitioned else [])
        i = rng.choice(choices)
        if i == 0:
            g.heal()
            self.partitioned = False
            self.actions["heal"] += 1
        elif i in self.crashed:
            g.restore(i)
            self.crashed.discard(i)
            self.actions["restore"] += 1
        else:
            g.start(i)
            self.stopped.discard(i)
            self.actions["start"] += 1

    def repair_all(self) -> None:
        for i in sorted(self.crashed):
            self.g.restore(i)
        for i in sorted(self.stopped):
            self.g.start(i)
        self.crashed.clear()
        self.stopped.clear()
        self.g.heal()
        self.partitioned = False


#: Seeds of the linear-history test by default (well under a second each).
DEFAULT_HISTORY_SEEDS = 16


class LinearHistoryTests(ShardMasterCase):
    def run_under_faults(
        self, seed: int, n: int, nclients: int, duration: float, *, check_quorum: bool = True
    ) -> dict[str, Any]:
        # Small snapshot threshold: restarted and lagging replicas also catch
        # up by snapshot, so the state machine's restore is on the path.
        # Without check-quorum a cut-off leader keeps believing it leads until
        # it hears a newer term: only ReadIndex keeps its reads fresh.
        g = self.group(n, seed, snapshot_entries=40, config_overrides={"check_quorum": check_quorum})
        g.wait_for_leader()
        g.cluster.net.set_unreliable(drop=0.05, long_delay_prob=0.01)
        g.rpc.set_faults(drop_request=0.05, drop_reply=0.05, delay=(0.001, 0.01))
        workload = AdminWorkload(g, nclients)
        nemesis = Nemesis(g)
        done = workload.start(duration)
        end = g.clock.seconds() + duration
        while g.clock.seconds() < end:
            g.run(nemesis.rng.uniform(0.3, 1.2), STEP)
            nemesis.step()
        # Heal everything; the clients finish their last calls.
        nemesis.repair_all()
        g.rpc.set_faults(drop_request=0.0, drop_reply=0.0)
        g.cluster.net.set_reliable()
        if not g.settle(done, 30.0, STEP):
            self.fail(f"seed={seed}: clients still running 30 s after the faults stopped")
        for d in done:
            ok, value = resolve(d)
            self.assertTrue(ok, f"seed={seed}: a client loop crashed: {value!r}")
        g.converge()
        g.cluster.check_invariants()

        # One history every replica agrees on, byte for byte.
        snapshots = {i: g.cluster.state_machines[i].snapshot() for i in g.ids}
        self.assertEqual(
            len(set(snapshots.values())),
            1,
            f"seed={seed}: replicas differ: latest {[g.cluster.state_machines[i].latest.num for i in g.ids]}",
        )
        machine = g.cluster.state_machines[g.ids[0]]
        self.assertEqual(machine.oldest_num, 0, f"seed={seed}: history was trimmed")
        maps = [machine.query(num) for num in range(machine.latest.num + 1)]
        # A fresh client reads the same latest map.
        self.assertEqual(self.value(g, self.client(g, "auditor").query(-1)), maps[-1], f"seed={seed}")

        bad = [op for op in workload.ops if op.outcome in ("refused", "error", "pending")]
        self.assertEqual(bad, [], f"seed={seed}: calls failed in a way the workload never expects")
        problems = HistoryCheck(maps, workload.ops).run()
        if problems:
            self.fail(f"{len(problems)} problems:\n" + "\n".join(problems[:10]))
        outcomes = Counter((op.kind, op.outcome) for op in workload.ops)
        return {
            # Unknown-outcome writes the check found in the history: they
            # took effect although their caller gave up.
            "unknown_applied": sum(
                1 for op in workload.ops if op.outcome == "unknown" and op.num is not None
            ),
            "maps": len(maps) - 1,
            "outcomes": outcomes,
            "actions": nemesis.actions,
            "requests_dropped": g.rpc.requests_dropped + g.rpc.replies_dropped,
        }

    def test_concurrent_admins_under_faults_make_one_linear_history(self) -> None:
        """3 or 5 replicas (check-quorum on or off), 5 admin clients for 12
        simulated seconds of drops, crashes, restarts and partitions."""
        seeds = sim_seeds(DEFAULT_HISTORY_SEEDS)
        unknown_applied = 0
        for seed in seeds:
            try:
                stats = self.run_under_faults(
                    seed, n=3 if seed % 2 == 0 else 5, nclients=5, duration=12.0, check_quorum=seed % 3 != 1
                )
                where = f"seed={seed}: {stats}"
                # The run did something worth checking: writes of every kind
                # acknowledged, reads answered, faults injected.
                for kind in ("join", "leave", "move", "query"):
                    self.assertGreater(stats["outcomes"][(kind, "ok")], 0, where)
                self.assertGreater(stats["maps"], 20, where)
                self.assertGreater(sum(stats["actions"].values()), 5, where)
                self.assertGreater(stats["requests_dropped"], 0, where)
            except InvariantViolation:
                raise  # names its seed already
            except AssertionError as e:
                raise AssertionError(f"seed={seed} (replay with RAFT_SEED={seed}): {e}") from e
            unknown_applied += stats["unknown_applied"]
        if len(seeds) >= DEFAULT_HISTORY_SEEDS:
            # Some write whose caller gave up took effect anyway, so matching
            # maps to unknown-outcome writes was exercised.
            self.assertGreater(unknown_applied, 0, f"seeds {seeds}")


class HistoryCheckTests(SynchronousTestCase):
    """The checker itself must catch broken histories (else the property
    test above could pass vacuously)."""

    def maps(self) -> list[ShardMap]:
        m0 = ShardMap.initial(4)
        m1 = ShardMap(1, (1, 1, 1, 1), {1: ("a.sim:1",)})
        m2 = ShardMap(2, (1, 1, 2, 2), {1: ("a.sim:1",), 2: ("b.sim:1",)})
        m3 = ShardMap(3, (2, 1, 2, 2), {1: ("a.sim:1",), 2: ("b.sim:1",)})
        return [m0, m1, m2, m3]

    def ops(self) -> list[Op]:
        maps = self.maps()
        return [
            Op(0, "join", {1: ["a.sim:1"]}, 0, 1, "ok", 1),
            Op(1, "query", -1, 2, 3, "ok", maps[1]),
            Op(0, "join", {2: ["b.sim:1"]}, 4, 5, "ok", 2),
            Op(1, "move", (0, 2), 6, 7, "unknown", Timeout("t")),
            Op(0, "query", -1, 8, 9, "ok", maps[3]),
        ]

    def test_a_good_history_passes(self) -> None:
        self.assertEqual(HistoryCheck(self.maps(), self.ops()).run(), [])

    def test_an_unexplained_map_is_caught(self) -> None:
        ops = self.ops()
        del ops[3]  # nobody asked for the move that made map 3
        problems = HistoryCheck(self.maps(), ops).run()
        self.assertTrue(any("map 3 is not explained" in p for p in problems), problems)

    def test_a_write_applied_twice_is_caught(self) -> None:
        maps = self.maps()
        maps.append(ShardMap(4, maps[3].shards, maps[3].groups))  # the move again
        problems = HistoryCheck(maps, self.ops()).run()
        self.assertTrue(any("map 4 is not explained" in p for p in problems), problems)

    def test_a_stale_read_is_caught(self) -> None:
        ops = self.ops()
        ops.append(Op(0, "query", -1, 10, 11, "ok", self.maps()[1]))
        problems = HistoryCheck(self.maps(), ops).run()
        self.assertTrue(any("went back in time" in p for p in problems), problems)
        self.assertTrue(any("completed first" in p for p in problems), problems)

    def test_a_wrong_acknowledged_number_is_caught(self) -> None:
        ops = self.ops()
        ops[2].result = 3
        problems = HistoryCheck(self.maps(), ops).run()
        self.assertTrue(any("does not explain" in p for p in problems), problems)

    def test_a_gap_is_caught(self) -> None:
        maps = self.maps()
        del maps[2]
        self.assertTrue(HistoryCheck(maps, self.ops()).run())

    def test_a_map_that_differs_from_the_history_is_caught(self) -> None:
        ops = self.ops()
        ops[4].result = ShardMap(3, (1, 2, 2, 2), {1: ("a.sim:1",), 2: ("b.sim:1",)})
        problems = HistoryCheck(self.maps(), ops).run()
        self.assertTrue(any("not the history's" in p for p in problems), problems)

    def test_a_leave_refused_as_the_last_is_held_to_the_maps(self) -> None:
        last = BadRequest(f"leave of [1] {LAST_GROUPS_REFUSED}: join another group first, then leave")
        # Map 1 holds only group 1: refusing its leave then is right.
        ops = self.ops()
        ops.insert(1, Op(1, "leave", [1], 2, 3, "refused_last", last))
        self.assertEqual(HistoryCheck(self.maps(), ops).run(), [])
        # Once group 2 joined (map 2), group 1 was not the last one.
        ops = self.ops()
        ops.append(Op(1, "leave", [1], 10, 11, "refused_last", last))
        problems = HistoryCheck(self.maps(), ops).run()
        self.assertTrue(any("all hold other groups" in p for p in problems), problems)

    def test_an_unknown_write_before_its_invocation_is_caught(self) -> None:
        ops = self.ops()
        ops[3].invoked = 10  # the move was asked only after map 3 was read
        ops[3].completed = 11
        problems = HistoryCheck(self.maps(), ops).run()
        self.assertTrue(any("map 3 is not explained" in p for p in problems), problems)
