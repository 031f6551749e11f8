"""Reachability: the partition/isolate/cut rules both simulated networks share."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from raft.testing.simnet import Reachability


class ReachabilityTests(SynchronousTestCase):
    def test_partition_confines_listed_endpoints(self) -> None:
        for unlisted_reach_all in (False, True):
            r: Reachability[str] = Reachability(unlisted_reach_all)
            r.partition(["a", "b"], ["c"])
            self.assertTrue(r.connected("a", "b"))
            self.assertFalse(r.connected("a", "c"))
            self.assertFalse(r.connected("c", "b"))
            # "x" is in no group: a Raft node reaches no one, an RPC client everyone.
            self.assertEqual(r.connected("x", "a"), unlisted_reach_all)
            self.assertEqual(r.connected("c", "x"), unlisted_reach_all)
            self.assertTrue(r.connected("c", "c"))

    def test_isolate_cut_reconnect_heal(self) -> None:
        r: Reachability[int] = Reachability(False)
        r.isolate(1)
        r.cut(2, 3, both_ways=False)
        self.assertEqual(r.isolated, frozenset({1}))
        self.assertFalse(r.connected(1, 2) or r.connected(2, 1))
        self.assertFalse(r.connected(2, 3))
        self.assertTrue(r.connected(3, 2))
        r.reconnect(2)  # drops the cut touching 2, not 1's isolation
        self.assertTrue(r.connected(2, 3))
        self.assertFalse(r.connected(1, 3))
        r.partition([1], [2, 3])  # a partition replaces isolation and cuts
        self.assertEqual(r.isolated, frozenset())
        self.assertFalse(r.connected(1, 2))
        r.heal()
        self.assertTrue(r.connected(1, 2) and r.connected(3, 1))
