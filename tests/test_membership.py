"""Membership change of a metadata group in simulated time, on the real
replicas, shard watcher, migrator and client library (tests/simworld.py):
a group grown from 3 voters to 5 and shrunk back, and a replica replaced,
while clients write and read, leaders are restarted and cut off, and shards
move between groups. Every history is checked for linearizability (which
also catches a lost or doubly applied acknowledged write: versions are
compare-and-set), Raft's invariants are checked as the run goes (one leader
per term, committed entries on a majority of the voters that committed
them), and the ShardMaster ends up listing the group's new addresses.
The ShardMaster's own replicas are replaced the same way, after which an
added replica leads and the groups and clients that know it only from the
config still reach it.

``SURFSHARD_SEED=N`` replays a seed; ``SURFSHARD_SEEDS=K`` runs K seeds.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from twisted.internet import defer, task

from surfshard import errors
from surfshard.replica.leader_caller import LeaderCaller
from surfshard.testing.linearizability import GET, UPDATE, HistoryRecorder, Mismatch
from surfshard.testing.simrpc import resolve
from tests.simworld import SimWorld
from tests.test_migration_sim import NAMES, UNKNOWN_OUTCOME, WorldCase, block, world_seeds

#: (action, raft id): the group goes 3 -> 4 -> 5 voters, back to 3, then
#: replaces node 2 by node 6.
PLAN = [("add", 4), ("add", 5), ("remove", 4), ("remove", 5), ("remove", 2), ("add", 6)]
FINAL_VOTERS = [1, 3, 6]


def address(i: int) -> str:
    return f"g1-n{i}.sim:7000"


def sm_address(i: int) -> str:
    return f"sm-n{i}.sim:7000"


class MembershipWorld:
    """Drives ``plan`` on a replica group of ``w`` (group 1 unless given)
    through admin calls, as ``surfshard admin member`` does."""

    def __init__(
        self,
        w: SimWorld,
        group: Any = None,
        plan: list[tuple[str, int]] = PLAN,
        address_of: Any = address,
    ) -> None:
        self.w = w
        self.group = w.groups[1] if group is None else group
        self.plan = plan
        self.address_of = address_of
        self.pool = w.rpc.pool("member-admin")
        self.step = 0
        self.in_flight: defer.Deferred[Any] | None = None
        #: [outcome] once the step in flight has finished (None: not yet).
        self.outcome: list[Any] | None = None
        self.done: list[tuple[str, int]] = []

    def caller(self) -> LeaderCaller:
        return LeaderCaller(
            self.pool,
            [self.group.addresses[i] for i in self.group.ids],
            self.w.clock,
            timeout=2.0,
            rng=random.Random(f"member-admin:{self.w.seed}:{self.step}"),
        )

    def voters(self) -> list[int]:
        leader = self.group.cluster.leader()
        return [] if leader is None else sorted(self.group.node(leader).core.voters)

    def poke(self) -> None:
        """Start the plan's next step, or finish the current one."""
        if self.in_flight is not None and self.outcome is None:
            return
        if self.in_flight is not None and self.outcome is not None:
            (value,) = self.outcome
            self.in_flight = self.outcome = None
            if not isinstance(value, Exception):
                action, i = self.plan[self.step]
                if action == "remove":
                    self.group.retire(i)
                self.done.append(self.plan[self.step])
                self.step += 1
        if self.step >= len(self.plan):
            return
        action, i = self.plan[self.step]
        if action == "add":
            if i not in self.group.ids:
                self.group.add(i, self.address_of(i))
            d = self.caller().call("member_add", {"address": self.address_of(i)}, timeout=10.0)
            # Done once the new server votes (promoted by the leader when caught up).
            d.addCallback(lambda r, i=i: self._wait_voter(i))
        else:
            d = self.caller().call("member_remove", {"node": i}, timeout=10.0)
        d.addErrback(lambda f: f.value)  # a failed step is tried again
        d.addCallback(self._finished)
        self.in_flight = d

    def _finished(self, value: Any) -> None:
        self.outcome = [value]

    @defer.inlineCallbacks
    def _wait_voter(self, i: int) -> Any:
        for _ in range(200):  # bounded: 20 simulated seconds
            if i in self.voters():
                return True
            yield task.deferLater(self.w.clock, 0.1, lambda: None)
        raise errors.Timeout(f"node {i} never became a voter")


class GroupGrowsAndShrinksUnderChaosTests(WorldCase):
    CLIENTS = 16
    FILES = [f"member-{i}" for i in range(24)]

    def run_plan(self, seed: int, *, restarts: bool, partitions: bool) -> Counter[str]:
        w = self.world(seed, gids=(1, 2), snapshot_entries=60, chunk_bytes=4096)
        w.join(1, 2)
        w.wait_settled()
        recorder = HistoryRecorder()
        stats: Counter[str] = Counter()
        problems: list[str] = []
        now = w.clock.seconds
        members = MembershipWorld(w)
        stop = [False]

        @defer.inlineCallbacks
        def client_loop(name: str) -> Any:
            rng = random.Random(f"member-workload:{seed}:{name}")
            c = w.client(name, timeout=6.0)
            last: dict[str, int] = {}
            while not stop[0]:  # bounded: the driver below stops it
                fname = rng.choice(self.FILES)
                if rng.random() < 0.6:
                    version = last.get(fname, 0) + 1
                    hashlist = [block(hash((name, fname, version)) % 10**9, version)]
                    op = recorder.invoke(name, UPDATE, fname, (version, hashlist), now())
                    try:
                        yield c.updatefile(fname, version, hashlist)
                    except errors.VersionMismatch as e:
                        recorder.complete(op, Mismatch(e.current), now())
                        last[fname] = e.current
                    except UNKNOWN_OUTCOME:
                        recorder.unknown(op)
                        stats["update_unknown"] += 1
                    except errors.SurfShardError as e:
                        recorder.unknown(op)
                        problems.append(f"{name} update({fname}, {version}) failed with {e!r}")
                    else:
                        recorder.complete(op, True, now())
                        last[fname] = version
                        stats["update_ok"] += 1
                else:
                    op = recorder.invoke(name, GET, fname, (), now())
                    try:
                        info = yield c.getfileinfo(fname)
                    except UNKNOWN_OUTCOME:
                        recorder.unknown(op)
                    except errors.SurfShardError as e:
                        recorder.unknown(op)
                        problems.append(f"{name} getfileinfo({fname}) failed with {e!r}")
                    else:
                        recorder.complete(op, (info[0], tuple(info[1])) if info[0] else None, now())
                        last[fname] = info[0]
                        stats["read_ok"] += 1
                yield task.deferLater(w.clock, rng.uniform(0.0, 0.05), lambda: None)

        loops = [client_loop(f"client{k}") for k in range(self.CLIENTS)]
        rng = random.Random(f"member-nemesis:{seed}")
        deadline = now() + 120.0
        chaos_until = now() + 10.0  # the plan takes a few seconds; the chaos goes on a while after
        while (members.step < len(PLAN) or now() < chaos_until) and now() < deadline:  # bounded
            members.poke()
            group = members.group
            leader = group.cluster.leader()
            f = rng.random()
            if restarts and leader is not None and f < 0.2:
                group.restart(leader)
                stats["restart_leader"] += 1
            elif restarts and f < 0.35:
                victim = rng.choice(group.ids)
                group.restart(victim)
                stats["restart"] += 1
            elif partitions and leader is not None and f < 0.5:
                group.cluster.net.isolate(leader)
                stats["isolate_leader"] += 1
            if rng.random() < 0.15:
                w.admin.move(rng.randrange(w.nshards), rng.choice((1, 2))).addErrback(lambda f: None)
                stats["move"] += 1
            w.run(rng.uniform(0.2, 0.6))
            group.cluster.net.heal()
        stop[0] = True
        self.assertEqual(members.done, PLAN, f"SURFSHARD_SEED={seed}: plan not finished in time")
        self.assertTrue(w.settle(loops, 30.0), f"SURFSHARD_SEED={seed}: client loops did not finish")
        w.wait_settled(90)
        group = members.group
        self.assertEqual(members.voters(), FINAL_VOTERS, f"SURFSHARD_SEED={seed}")
        # The ShardMaster lists the group's new addresses (the leader reports them).
        expected = {address(i) for i in FINAL_VOTERS}
        self.assertTrue(
            w.run_until(lambda: set(w.value(w.admin.query(-1)).groups[1]) == expected, 10.0),
            f"SURFSHARD_SEED={seed}: shard master lists {w.value(w.admin.query(-1)).groups[1]}",
        )
        final = w.client("final")
        for fname in self.FILES:
            op = recorder.invoke("final", GET, fname, (), now())
            info = w.value(final.getfileinfo(fname))
            recorder.complete(op, (info[0], tuple(info[1])) if info[0] else None, now())
        self.assertEqual(problems, [], f"SURFSHARD_SEED={seed}: unexpected errors")
        result = recorder.check()
        self.assertTrue(result.ok, f"SURFSHARD_SEED={seed}: not linearizable: {result.explanation}")
        group.cluster.check_invariants()
        stats["ops"] = len(recorder)
        return stats

    def run_seeds(self, default: int, **kind: bool) -> None:
        totals: Counter[str] = Counter()
        for seed in world_seeds(default):
            totals.update(self.run_plan(seed, **kind))
        self.assertGreater(totals["update_ok"], 50, totals)
        self.assertGreater(totals["read_ok"], 20, totals)

    def test_grow_to_five_and_back_to_three_under_writers(self) -> None:
        self.run_seeds(1, restarts=False, partitions=False)

    def test_with_restarts_and_partitions(self) -> None:
        self.run_seeds(2, restarts=True, partitions=True)


#: The ShardMaster's replicas replaced one by one until only the config's
#: third is left: callers that know only the config (clients, the groups'
#: map watchers, the admin) must find the others through it.
SM_PLAN = [("add", 4), ("remove", 1), ("add", 5), ("remove", 2)]
SM_FINAL_VOTERS = [3, 4, 5]


class ShardMasterReplacedUnderChaosTests(WorldCase):
    """The ShardMaster's own membership changed while shards move and its
    leader restarts; then an added replica leads, and clients and groups
    that know the ShardMaster only from the config still reach it."""

    def run_plan(self, seed: int, *, restarts: bool) -> None:
        w = self.world(seed, gids=(1, 2))
        w.join(1, 2)
        w.wait_settled()
        sm = w.shardmaster
        members = MembershipWorld(w, sm, SM_PLAN, sm_address)
        rng = random.Random(f"sm-member-nemesis:{seed}")
        deadline = w.clock.seconds() + 120.0
        while members.step < len(SM_PLAN) and w.clock.seconds() < deadline:  # bounded
            members.poke()
            leader = sm.cluster.leader()
            if restarts and leader is not None and rng.random() < 0.2:
                sm.restart(leader)
            if rng.random() < 0.3:
                w.admin.move(rng.randrange(w.nshards), rng.choice((1, 2))).addErrback(lambda f: None)
            w.run(rng.uniform(0.2, 0.6))
        self.assertEqual(members.done, SM_PLAN, f"SURFSHARD_SEED={seed}: plan not finished in time")
        self.assertTrue(
            w.run_until(lambda: members.voters() == SM_FINAL_VOTERS, 20.0),
            f"SURFSHARD_SEED={seed}: voters {members.voters()}",
        )
        # Leadership to an added replica: of the config's three, only the
        # third still runs, and it answers NOT_LEADER naming the leader.
        leader = sm.cluster.leader()
        assert leader is not None
        if leader == 3:
            sm.controls[3].transfer_leadership(4)
        self.assertTrue(
            w.run_until(lambda: sm.cluster.leader() in (4, 5), 20.0),
            f"SURFSHARD_SEED={seed}: leader {sm.cluster.leader()}",
        )
        before = w.value(w.admin.query(-1)).num
        client = w.client("after-replacement", timeout=20.0)
        self.write_files(w, client, NAMES[:12])
        num = w.value(w.client("admin-after", timeout=20.0).shardmaster.move(0, 2))
        self.assertGreater(num, before)
        w.wait_settled(60)  # both groups follow the new map
        self.assertEqual(w.serving()[2] & {0}, {0}, w.describe())
        self.read_all(w, client, NAMES[:12])
        sm.cluster.check_invariants()

    def test_replaced_while_shards_move(self) -> None:
        for seed in world_seeds(1):
            self.run_plan(seed, restarts=False)

    def test_replaced_while_its_leader_restarts(self) -> None:
        for seed in world_seeds(1):
            self.run_plan(seed, restarts=True)


class MembershipBadInputTests(WorldCase):
    def test_bad_member_calls_are_refused_and_change_nothing(self) -> None:
        w = self.world(gids=(1,))
        w.join(1)
        w.wait_settled()
        group = w.groups[1]
        leader = group.cluster.leader()
        assert leader is not None
        before = group.node(leader).membership
        pool = w.rpc.pool("bad-admin")
        for method, args in (
            ("member_add", {"address": "nowhere"}),
            ("member_add", {"address": ""}),
            ("member_add", {}),
            ("member_add", {"address": 7}),
            ("member_remove", {"node": 0}),
            ("member_remove", {"node": "2"}),
            ("members", {"extra": 1}),
        ):
            d = pool.call(group.addresses[leader], method, args, 5.0)
            self.assertTrue(w.run_until(lambda d=d: d.called, 10))
            ok, value = resolve(d)
            self.assertFalse(ok, (method, args))
            self.assertIsInstance(value, errors.BadRequest, (method, args))
        self.assertEqual(group.node(leader).membership, before)
        # Down to one voter: removing it too is refused.
        caller = LeaderCaller(
            pool, [group.addresses[i] for i in group.ids], w.clock, timeout=2.0, rng=random.Random(w.seed)
        )
        for node in [i for i in group.ids if i != leader]:
            self.assertTrue(w.value(caller.call("member_remove", {"node": node}, timeout=10.0))["removed"])
        d = caller.call("member_remove", {"node": leader}, timeout=10.0)
        self.assertTrue(w.run_until(lambda: d.called, 20))
        ok, value = resolve(d)
        self.assertFalse(ok)
        self.assertIsInstance(value, errors.BadRequest)
        self.assertIn("only voter", str(value))
        self.assertEqual(group.node(leader).membership.voters, (leader,))
