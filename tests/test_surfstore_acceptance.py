"""SurfStore's acceptance scenario against real processes, the way its graders
drive it: nodes started with ``run-server.sh CONFIG ID`` from a SurfStore
``M: N`` config, and every observation made through ``xmlrpc.client`` at
``http://host:port/RPC2``.

The scenario, for a group of N nodes (majority M = N // 2 + 1):

1. start the nodes one at a time: while fewer than M run, no leader appears
   (checked over a window of polling, since no single look can show it);
   the M-th start yields exactly one leader within 5 s; later nodes become
   followers and the leader stays;
2. update files through the leader (and see a follower refuse, a stale
   version answer False);
3. crash the leader (``surfstore.crash``) again and again: while a majority
   remains, a new leader appears within 5 s among the live nodes and takes
   updates; once only a minority is up, no leader appears;
4. an ``updatefile`` sent to a live node then blocks (it runs in a thread
   with a socket timeout and is seen not to return) until ``surfstore.restore``
   brings back a majority, and then answers True;
5. after restoring every node, ``tester_getversion`` on every node reaches
   the committed versions.

The blocked call goes to a node that is then alone; the nodes restored to
make a majority are the earliest crashed. With N = 5 their logs lack the
third leader's term, which the lone node has, so Raft's election restriction
makes the lone node the winner. With N = 4 the last leader is among them and
resumes leading, and the lone node finishes the call there (same client id
and sequence number, so it applies once) and still answers True, as a
SurfStore client expects of a call that blocked.

``test_leader_blocks_while_followers_crashed`` is the shape SurfStore's own
graders use: the leader takes an update while every follower is crashed, and
it must answer True once they are restored, whichever node Raft then elects.
"""

from __future__ import annotations

import hashlib
import threading
import time
import xmlrpc.client
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from surfshard.errors import ErrorCode
from surfshard.metadata.facade import FAULT_CODES
from tests import procs

#: The scenario's own deadlines (the Raft defaults elect in a few hundred ms).
LEADER_DEADLINE = 5.0
#: How long "no leader" must hold to count: several election timeouts.
NO_LEADER_WINDOW = 2.0
#: How long a new follower must leave the leader in place.
FOLLOWER_WINDOW = 1.0
#: How long a blocked call is watched not to return while a majority is down.
BLOCKED_WINDOW = 1.5
#: Applying committed entries on followers takes a heartbeat or two.
CONVERGE_DEADLINE = 10.0

NOT_LEADER_FAULT = FAULT_CODES[ErrorCode.NOT_LEADER]
CRASHED_FAULT = FAULT_CODES[ErrorCode.CRASHED]


def block_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class BlockedCall:
    """A blocking XML-RPC ``updatefile`` in a thread of its own, so the test
    can watch it not return. Holds the result or the exception."""

    def __init__(self, address: str, name: str, version: int, hashlist: list[str], timeout: float) -> None:
        self.address = address
        self.args = (name, version, hashlist)
        self.result: Any = None
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.finished: float | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(timeout,), daemon=True)
        self._thread.start()

    def _run(self, timeout: float) -> None:
        try:
            self.result = procs.xmlrpc_proxy(self.address, timeout).surfstore.updatefile(*self.args)
        except BaseException as e:
            self.error = e
        finally:
            self.finished = time.monotonic()
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def describe(self) -> str:
        if not self.done:
            return f"updatefile{self.args[:2]} on {self.address}: still running"
        took = (self.finished or 0) - self.started
        return (
            f"updatefile{self.args[:2]} on {self.address}: {self.result!r} / {self.error!r} after {took:.2f}s"
        )


class Scenario:
    """One run of the scenario over a ``procs.Cluster`` of SurfStore nodes."""

    def __init__(self, test: SynchronousTestCase, cluster: procs.Cluster) -> None:
        self.test = test
        self.cluster = cluster
        self.n = len(cluster)
        self.majority = self.n // 2 + 1
        self.crashed: list[int] = []  # in crash order
        self.committed: dict[str, int] = {}
        self.contents: dict[str, list[str]] = {}
        self.failovers: list[float] = []
        #: Whether the node the blocked update went to leads once it returned.
        self.blocked_node_leads = False

    # -- plumbing ---------------------------------------------------------

    def rpc(self, i: int, timeout: float = 10.0) -> Any:
        return self.cluster.proxy(i, timeout).surfstore

    def live(self) -> list[int]:
        return [i for i in self.cluster.running() if i not in self.crashed]

    def leaders(self) -> list[int]:
        return self.cluster.leaders(self.cluster.running())

    def confirmed_leader(self) -> int:
        """The leader of the live nodes, once it proves it: a node restored
        from a crash as leader of an older term claims to lead until its
        first heartbeat meets the newer term, but cannot serve a
        linearizable read (which needs a majority to confirm it)."""

        def proven() -> int | None:
            found = self.leaders()
            if len(found) != 1:
                return None
            try:
                self.rpc(found[0], timeout=5.0).getfileinfomap()
            except xmlrpc.client.Fault:
                return None
            except Exception as e:  # a stale leader may also just not answer in time
                if procs.is_connection_error(e):
                    return None
                raise
            return found[0] + 1  # node 0 is falsy

        return procs.wait_until(proven, LEADER_DEADLINE, 0.05, "no leader proved itself") - 1

    def no_leader_for(self, seconds: float, why: str) -> None:
        held, when = procs.holds_for(lambda: not self.leaders(), seconds)
        self.test.assertTrue(held, f"{why}: a leader appeared after {when}s: {self.leaders()}")

    def update(self, leader: int, name: str) -> None:
        """One committed update of ``name`` through ``leader``."""
        version = self.committed.get(name, 0) + 1
        hashlist = [block_hash(f"{name}/{version}/{k}") for k in range(version)]
        self.test.assertIs(
            self.rpc(leader).updatefile(name, version, hashlist), True, f"update {name} v{version}"
        )
        self.committed[name] = version
        self.contents[name] = hashlist

    def assert_map(self, leader: int) -> None:
        expected = {n: [v, self.contents[n]] for n, v in self.committed.items()}
        self.test.assertEqual(self.rpc(leader).getfileinfomap(), expected)

    def wait_versions(self, nodes: list[int]) -> None:
        """Every node in ``nodes`` applied every committed version."""

        def behind() -> dict[int, dict[str, int]]:
            lag = {}
            for i in nodes:
                rpc = self.rpc(i)
                seen = {n: rpc.tester_getversion(n) for n in self.committed}
                if seen != self.committed:
                    lag[i] = seen
            return lag

        procs.wait_until(
            lambda: not behind(),
            CONVERGE_DEADLINE,
            0.1,
            lambda: f"nodes lag behind {self.committed}: {behind()}",
        )

    def crash(self, i: int) -> None:
        self.test.assertIs(self.rpc(i).crash(), True)
        self.test.assertIs(self.rpc(i).isCrashed(), True)
        self.crashed.append(i)

    def restore(self, i: int) -> None:
        self.test.assertIs(self.rpc(i).restore(), True)
        self.test.assertIs(self.rpc(i).isCrashed(), False)
        self.crashed.remove(i)

    def assert_fault(self, code: int, call: Any, *args: Any) -> xmlrpc.client.Fault:
        with self.test.assertRaises(xmlrpc.client.Fault) as caught:
            call(*args)
        self.test.assertEqual(caught.exception.faultCode, code, caught.exception.faultString)
        return caught.exception

    # -- the phases -------------------------------------------------------

    def start_one_at_a_time(self) -> int:
        leader: int | None = None
        for i in range(self.n):
            self.cluster.start(i)
            up = i + 1
            if up < self.majority:
                self.no_leader_for(NO_LEADER_WINDOW, f"{up} of {self.n} nodes up")
            elif up == self.majority:
                leader = self.cluster.wait_for_leader(list(range(up)), LEADER_DEADLINE)
            else:
                held, when = procs.holds_for(lambda was=leader: self.leaders() == [was], FOLLOWER_WINDOW)
                self.test.assertTrue(
                    held, f"node {i} joined: leader {leader} did not stay ({self.leaders()} at {when}s)"
                )
        assert leader is not None
        return leader

    def first_updates(self, leader: int) -> None:
        for name in ("a.txt", "b.txt", "dir name/é.bin"):
            self.update(leader, name)
        self.update(leader, "a.txt")
        # SurfStore answers False, not a fault, for a stale version.
        self.test.assertIs(self.rpc(leader).updatefile("a.txt", 1, [block_hash("stale")]), False)
        self.test.assertIs(self.rpc(leader).updatefile("new.txt", 2, [block_hash("skip")]), False)
        followers = [i for i in range(self.n) if i != leader]
        if followers:
            fault = self.assert_fault(
                NOT_LEADER_FAULT, self.rpc(followers[0]).updatefile, "f.txt", 1, [block_hash("f")]
            )
            self.test.assertIn(self.cluster.addresses[leader], fault.faultString)
        self.assert_map(leader)
        self.wait_versions(list(range(self.n)))

    def crash_leaders(self, leader: int) -> int:
        """Crash leaders while a majority survives each crash; returns the
        last leader (still up)."""
        rounds = 0
        while len(self.live()) - 1 >= self.majority:
            rounds += 1
            self.test.assertLessEqual(rounds, self.n, "bounded: one failover per node at most")
            self.crash(leader)
            # A crashed node faults every call but isCrashed/isLeader/tester_getversion.
            self.assert_fault(CRASHED_FAULT, self.rpc(leader).getfileinfomap)
            self.assert_fault(CRASHED_FAULT, self.rpc(leader).updatefile, "x", 1, [])
            self.test.assertIs(self.rpc(leader).isLeader(), False)
            t0 = time.monotonic()
            new = self.cluster.wait_for_leader(self.live(), LEADER_DEADLINE)
            self.failovers.append(time.monotonic() - t0)
            self.test.assertNotEqual(new, leader)
            self.test.assertEqual(self.leaders(), [new])
            leader = new
            self.update(leader, f"after-failover-{rounds}.txt")
            self.update(leader, "a.txt")
            self.assert_map(leader)
            self.wait_versions(self.live())
        return leader

    def lose_majority(self, leader: int) -> int:
        """Crash the leader once more, leaving a minority: no leader appears.
        Then crash the other live nodes but one, which is returned."""
        self.crash(leader)
        self.test.assertLess(len(self.live()), self.majority)
        self.no_leader_for(NO_LEADER_WINDOW, f"only {self.live()} up")
        lone = self.live()[0]
        for i in self.live()[1:]:
            self.crash(i)
        return lone

    def blocked_update(self, lone: int) -> None:
        """An update sent while a majority is down blocks, and completes once
        restores bring a majority back."""
        name = "a.txt"
        version = self.committed[name] + 1
        hashlist = [block_hash(f"blocked/{version}")]
        call = BlockedCall(self.cluster.addresses[lone], name, version, hashlist, timeout=60.0)
        self.test.addCleanup(call.join, 5.0)
        held, when = procs.holds_for(lambda: not call.done, BLOCKED_WINDOW)
        self.test.assertTrue(held, f"returned with a majority down after {when}s: {call.describe()}")
        # Restore the earliest-crashed nodes first: their logs are the oldest.
        while len(self.live()) < self.majority:
            self.restore(self.crashed[0])
            if len(self.live()) < self.majority:
                # A node restored from a crash as leader of an older term
                # claims to lead until its first heartbeat meets the newer
                # term; after that, a minority has no leader.
                procs.wait_until(
                    lambda: not self.leaders(), 2.0, 0.05, f"a stale leader kept leading {self.live()}"
                )
                self.no_leader_for(NO_LEADER_WINDOW / 2, f"still a minority {self.live()}")
                self.test.assertFalse(call.done, f"returned with a minority up: {call.describe()}")
        procs.wait_until(lambda: call.done, LEADER_DEADLINE, 0.05, lambda: call.describe())
        self.test.assertIsNone(call.error, call.describe())
        self.test.assertIs(call.result, True, call.describe())
        leader = self.confirmed_leader()
        self.committed[name] = version
        self.contents[name] = hashlist
        self.assert_map(leader)
        self.blocked_node_leads = leader == lone

    def restore_all(self) -> None:
        for i in list(self.crashed):
            self.restore(i)
        leader = self.confirmed_leader()
        self.update(leader, "final.txt")
        self.assert_map(leader)
        self.wait_versions(list(range(self.n)))


class SurfStoreAcceptanceTests(SynchronousTestCase):
    """The scenario for N = 5, 4 and 1, each group a fresh set of processes."""

    def setUp(self) -> None:
        reason = procs.run_server_available()
        if reason is not None:
            raise SkipTest(reason)

    def make_cluster(self, n: int) -> procs.Cluster:
        cluster = procs.Cluster.surfstore(Path(self.mktemp()), n, launcher="run-server")
        self.addCleanup(cluster.cleanup)
        return cluster

    def run_scenario(self, n: int) -> Scenario:
        cluster = self.make_cluster(n)
        scenario = Scenario(self, cluster)
        with cluster.logs_on_failure():
            leader = scenario.start_one_at_a_time()
            scenario.first_updates(leader)
            leader = scenario.crash_leaders(leader)
            lone = scenario.lose_majority(leader)
            scenario.blocked_update(lone)
            scenario.restore_all()
        return scenario

    def test_five_nodes(self) -> None:
        scenario = self.run_scenario(5)
        # Two failovers (5 -> 4 -> 3 live), each within the deadline.
        self.assertEqual(len(scenario.failovers), 2, scenario.failovers)
        # Restored were the two leaders crashed first, whose logs lack the
        # third leader's term: only the blocked node could win.
        self.assertTrue(scenario.blocked_node_leads)

    def test_four_nodes(self) -> None:
        scenario = self.run_scenario(4)
        self.assertEqual(len(scenario.failovers), 1, scenario.failovers)

    def test_leader_blocks_while_followers_crashed(self) -> None:
        """SurfStore's grader shape, three times over: the leader takes an
        update while all its followers are crashed; it blocks until they are
        restored, then answers True, applied exactly once. Raft may elect a
        restored follower instead (the leader steps down when it loses its
        quorum), so this passes only if the call follows the leadership."""
        cluster = self.make_cluster(3)
        scenario = Scenario(self, cluster)
        with cluster.logs_on_failure():
            cluster.start_all()
            leader = scenario.confirmed_leader()
            scenario.update(leader, "g.txt")
            for _ in range(3):
                followers = [i for i in range(3) if i != leader]
                for i in followers:
                    scenario.crash(i)
                version = scenario.committed["g.txt"] + 1
                hashlist = [block_hash(f"g/{version}")]
                call = BlockedCall(cluster.addresses[leader], "g.txt", version, hashlist, timeout=60.0)
                self.addCleanup(call.join, 5.0)
                held, when = procs.holds_for(lambda c=call: not c.done, BLOCKED_WINDOW)
                self.assertTrue(held, f"returned with the followers crashed after {when}s: {call.describe()}")
                for i in followers:
                    scenario.restore(i)
                procs.wait_until(lambda c=call: c.done, 2 * LEADER_DEADLINE, 0.05, call.describe)
                self.assertIsNone(call.error, call.describe())
                self.assertIs(call.result, True, call.describe())
                scenario.committed["g.txt"] = version
                scenario.contents["g.txt"] = hashlist
                leader = scenario.confirmed_leader()
                scenario.assert_map(leader)
            scenario.wait_versions([0, 1, 2])

    def test_one_node(self) -> None:
        """One node is its own majority: it leads at once; crashed, nobody
        leads; restored, it leads again and still has its files."""
        cluster = self.make_cluster(1)
        scenario = Scenario(self, cluster)
        with cluster.logs_on_failure():
            cluster.start(0)
            self.assertEqual(cluster.wait_for_leader([0], LEADER_DEADLINE), 0)
            scenario.update(0, "solo.txt")
            scenario.update(0, "solo.txt")
            scenario.assert_map(0)
            scenario.crash(0)
            scenario.assert_fault(CRASHED_FAULT, scenario.rpc(0).updatefile, "solo.txt", 3, [])
            scenario.assert_fault(CRASHED_FAULT, scenario.rpc(0).ping)
            self.assertEqual(scenario.rpc(0).tester_getversion("solo.txt"), 2)
            scenario.no_leader_for(NO_LEADER_WINDOW / 2, "the only node crashed")
            scenario.restore(0)
            self.assertEqual(cluster.wait_for_leader([0], LEADER_DEADLINE), 0)
            scenario.update(0, "solo.txt")
            scenario.assert_map(0)
            scenario.wait_versions([0])
