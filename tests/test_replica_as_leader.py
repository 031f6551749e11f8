"""``ReplicaControl.as_leader``: the leader fast path and the waiting loop
answer the same way (results, retries after a lost leadership, error
mapping, deadlines), in simulated time."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, task
from twisted.trial import unittest

from raft.errors import NodeCrashed, NotLeaderError, ProposalDropped, RaftTimeout
from surfshard import errors
from surfshard.replica.control import ReplicaControl

ADDRESSES = {1: "127.0.0.1:7001", 2: "127.0.0.1:7002", 3: "127.0.0.1:7003"}


class FakeNode:
    """What as_leader looks at: role, known leader, crash flag."""

    def __init__(self, node_id: int = 1, leader_id: int | None = 1, crashed: bool = False) -> None:
        self.node_id = node_id
        self.leader_id = leader_id
        self.crashed = crashed

    @property
    def is_leader(self) -> bool:
        return self.leader_id == self.node_id


class Attempts:
    """An attempt function answering from a script, one outcome per call."""

    def __init__(self, *outcomes: Any) -> None:
        self.outcomes = list(outcomes)
        self.remaining: list[float] = []

    def __call__(self, remaining: float) -> defer.Deferred:
        self.remaining.append(remaining)
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            return defer.fail(outcome)
        return defer.succeed(outcome)


class AsLeaderTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.node = FakeNode()
        self.control = ReplicaControl(self.node, ADDRESSES, self.clock, poll_interval=0.02)  # type: ignore[arg-type]

    def advance(self, seconds: float, step: float = 0.01) -> None:
        for _ in range(round(seconds / step)):
            self.clock.advance(step)

    def test_leader_answers_at_once(self) -> None:
        attempts = Attempts("result")
        d = self.control.as_leader(attempts, timeout=5.0)
        self.assertEqual(self.successResultOf(d), "result")
        self.assertEqual(attempts.remaining, [5.0])

    def test_lost_leadership_is_retried_after_a_pause(self) -> None:
        attempts = Attempts(ProposalDropped("lost"), "second")
        d = self.control.as_leader(attempts, timeout=5.0)
        self.assertNoResult(d)
        self.assertEqual(len(attempts.remaining), 1)
        self.advance(0.02)
        self.assertEqual(self.successResultOf(d), "second")
        self.assertEqual(len(attempts.remaining), 2)

    def test_lost_leadership_to_another_node_answers_not_leader(self) -> None:
        attempts = Attempts(NotLeaderError(2))
        d = self.control.as_leader(attempts, timeout=5.0)
        self.node.leader_id = 2
        self.advance(0.02)
        failure = self.failureResultOf(d, errors.NotLeader)
        self.assertEqual(failure.value.leader, ADDRESSES[2])

    def test_raft_timeout_becomes_timeout(self) -> None:
        d = self.control.as_leader(Attempts(RaftTimeout("slow")), timeout=1.0)
        self.failureResultOf(d, errors.Timeout)

    def test_node_crashed_becomes_crashed(self) -> None:
        d = self.control.as_leader(Attempts(NodeCrashed("down")), timeout=1.0)
        self.failureResultOf(d, errors.Crashed)

    def test_other_errors_pass_through(self) -> None:
        d = self.control.as_leader(Attempts(errors.VersionMismatch("no", current=3)), timeout=1.0)
        self.assertEqual(self.failureResultOf(d, errors.VersionMismatch).value.current, 3)

    def test_plain_value_from_attempt_is_the_result(self) -> None:
        self.assertEqual(self.successResultOf(self.control.as_leader(lambda remaining: 7, timeout=1.0)), 7)

    def test_attempt_raising_fails_the_deferred(self) -> None:
        def attempt(remaining: float) -> defer.Deferred:
            raise ValueError("bug")

        self.failureResultOf(self.control.as_leader(attempt, timeout=1.0), ValueError)

    def test_crashed_leader_answers_crashed(self) -> None:
        self.node.crashed = True
        attempts = Attempts("never")
        self.failureResultOf(self.control.as_leader(attempts, timeout=1.0), errors.Crashed)
        self.assertEqual(attempts.remaining, [])

    def test_follower_names_the_leader(self) -> None:
        self.node.leader_id = 3
        failure = self.failureResultOf(
            self.control.as_leader(Attempts("never"), timeout=1.0), errors.NotLeader
        )
        self.assertEqual(failure.value.leader, ADDRESSES[3])

    def test_waits_out_an_election(self) -> None:
        self.node.leader_id = None
        attempts = Attempts("elected")
        d = self.control.as_leader(attempts, timeout=1.0)
        self.advance(0.1)
        self.assertNoResult(d)
        self.node.leader_id = 1
        self.advance(0.02)
        self.assertEqual(self.successResultOf(d), "elected")
        self.assertLess(attempts.remaining[0], 1.0)

    def test_no_leader_until_the_deadline_times_out(self) -> None:
        self.node.leader_id = None
        d = self.control.as_leader(Attempts(), timeout=0.5)
        self.advance(0.48)
        self.assertNoResult(d)
        self.advance(0.04)
        self.failureResultOf(d, errors.Timeout)

    def test_zero_timeout_times_out_without_an_attempt(self) -> None:
        attempts = Attempts("never")
        self.failureResultOf(self.control.as_leader(attempts, timeout=0.0), errors.Timeout)
        self.assertEqual(attempts.remaining, [])

    def test_dropped_until_the_deadline_times_out(self) -> None:
        attempts = Attempts(*[ProposalDropped("lost")] * 100)
        d = self.control.as_leader(attempts, timeout=0.1)
        self.advance(0.2)
        self.failureResultOf(d, errors.Timeout)
        self.assertLess(len(attempts.remaining), 10)
