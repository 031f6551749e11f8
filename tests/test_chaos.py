"""``surfshard chaos random``'s schedule (client.chaos.random_schedule):
seeded, keeps a majority of every group up, and picks from the replicas
given (a group's members now, after membership changes), not only the
config's."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from client.chaos import node_label, random_schedule
from surfshard.config import NodeKind, NodeRef, load_config
from tests.test_config import CONFIGS


class RecordingPool:
    """Answers every crash/restore at once, and records them."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def call(self, address: str, method: str, args: Any, timeout: float | None = None) -> defer.Deferred:
        self.calls.append((method, address))
        return defer.succeed(True)


class RandomScheduleTests(SynchronousTestCase):
    def run_schedule(self, seed: int, nodes: list[NodeRef] | None) -> tuple[list[Any], RecordingPool]:
        cluster = load_config(CONFIGS / "local.toml")
        clock, pool = Clock(), RecordingPool()
        d = random_schedule(clock, cluster, pool, 60.0, seed, lambda line: None, nodes=nodes)
        for _ in range(1000):  # bounded: 100 simulated seconds
            if d.called:
                break
            clock.advance(0.1)
        return self.successResultOf(d), pool

    def test_the_members_now_are_the_targets_and_a_majority_stays_up(self) -> None:
        cluster = load_config(CONFIGS / "local.toml")
        removed = "127.0.0.1:7101"
        added = NodeRef(NodeKind.GROUP, 1, -1, "127.0.0.1:7104")
        members = [n for n in cluster.all_nodes() if n.address != removed] + [added]
        group_1 = {n.address for n in members if n.kind is NodeKind.GROUP and n.gid == 1}
        for seed in range(5):
            actions, pool = self.run_schedule(seed, members)
            targets = {address for _, address in pool.calls}
            self.assertNotIn(removed, targets, seed)
            down: set[str] = set()
            for _, method, address in actions:
                (down.add if method == "crash" else down.discard)(address)
                # Group 1 has three members now: at most one of them down.
                self.assertLessEqual(len(down & group_1), 1, (seed, actions))
        # Over the seeds the added replica is crashed at least once.
        hit = any(
            added.address in {a for _, a in self.run_schedule(seed, members)[1].calls} for seed in range(5)
        )
        self.assertTrue(hit)

    def test_one_seed_one_schedule(self) -> None:
        self.assertEqual(self.run_schedule(3, None)[0], self.run_schedule(3, None)[0])

    def test_labels(self) -> None:
        self.assertEqual(node_label(NodeRef(NodeKind.GROUP, 1, 2, "h:1")), "group-1-2")
        self.assertEqual(node_label(NodeRef(NodeKind.GROUP, 1, -1, "h:4")), "group-1 replica h:4")
