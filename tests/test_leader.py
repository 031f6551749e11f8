"""LeaderCaller: following hints, retrying, backing off, giving up, cancelling.

Driven by a scripted pool and a ``Clock``: every call the caller makes is
recorded with its Deferred, and the test answers it.
"""

from __future__ import annotations

import random
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from surfshard import errors
from surfshard.net.interfaces import IPipelinedPool, IRpcPool
from surfshard.replica.leader_caller import LeaderCaller

ADDRESSES = ["a:1", "b:1", "c:1"]


@implementer(IRpcPool)
class ScriptedPool:
    """Records ``call``s; the test fires their Deferreds."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any], defer.Deferred[Any]]] = []

    def call(self, address: str, method: str, args: dict[str, Any], timeout: float | None = None) -> Any:
        d: defer.Deferred[Any] = defer.Deferred()
        self.calls.append((address, method, args, d))
        return d

    def close(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def last(self) -> tuple[str, defer.Deferred[Any]]:
        address, _, _, d = self.calls[-1]
        return address, d


class LeaderCallerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.pool = ScriptedPool()
        self.caller = LeaderCaller(
            self.pool, ADDRESSES, self.clock, timeout=5.0, attempt_timeout=1.0, rng=random.Random(1)
        )

    def test_first_answer_is_the_result_and_names_the_leader(self) -> None:
        d = self.caller.call("updatefile", {"name": "f"})
        address, attempt = self.pool.last()
        self.assertEqual(address, "a:1")
        self.assertFalse(d.called)
        attempt.callback(7)
        self.assertEqual(self.successResultOf(d), 7)
        self.assertEqual(self.caller.leader, "a:1")
        # The server may wait almost as long as the attempt does.
        self.assertAlmostEqual(self.pool.calls[0][2]["timeout"], 0.95)

    def test_not_leader_hint_is_followed_at_once(self) -> None:
        d = self.caller.call("updatefile", {})
        self.pool.last()[1].errback(errors.NotLeader("no", leader="c:1"))
        address, attempt = self.pool.last()
        self.assertEqual((address, len(self.pool.calls)), ("c:1", 2))
        self.assertFalse(d.called, "the call fired before its retry answered")
        attempt.callback("ok")
        self.assertEqual(self.successResultOf(d), "ok")
        self.assertEqual(self.caller.leader, "c:1")

    def test_a_hint_to_an_unknown_address_is_not_followed_by_default(self) -> None:
        d = self.caller.call("updatefile", {})
        self.pool.last()[1].errback(errors.NotLeader("no", leader="elsewhere:1"))
        self.clock.advance(0.05)
        address, attempt = self.pool.last()
        self.assertEqual(address, "b:1", "followed a hint outside the group's addresses")
        attempt.callback("ok")
        self.successResultOf(d)
        self.assertEqual(self.caller.addresses, ADDRESSES)

    def test_a_caller_that_learns_members_follows_and_keeps_a_new_leader(self) -> None:
        # The ShardMaster's callers know the config's replicas; the leader
        # may be one added since, which the others name.
        self.caller.learn_members = True
        d = self.caller.call("query", {})
        self.pool.last()[1].errback(errors.NotLeader("no", leader="new:1"))
        address, attempt = self.pool.last()
        self.assertEqual((address, len(self.pool.calls)), ("new:1", 2))
        attempt.callback("map")
        self.assertEqual(self.successResultOf(d), "map")
        self.assertEqual(self.caller.addresses, [*ADDRESSES, "new:1"])
        self.assertEqual(self.caller.leader, "new:1")
        # Later calls go there first; once it fails they rotate over it too.
        self.caller.call("query", {})
        self.assertEqual(self.pool.last()[0], "new:1")
        # A hint that is no address is never taken.
        d = self.caller.call("query", {})
        self.pool.last()[1].errback(errors.NotLeader("no", leader="not an address"))
        self.assertNotIn("not an address", self.caller.addresses)
        self.clock.advance(5.0)
        self.failureResultOf(d, errors.Timeout)

    def test_learnt_addresses_are_bounded_the_oldest_making_room(self) -> None:
        from surfshard.replica.leader_caller import MAX_LEARNED_ADDRESSES

        self.caller.learn_members = True
        total = MAX_LEARNED_ADDRESSES + 5
        for i in range(total):
            d = self.caller.call("query", {})
            self.pool.last()[1].errback(errors.NotLeader("no", leader=f"n{i}:1"))
            address, attempt = self.pool.last()
            self.assertEqual(address, f"n{i}:1", "a new leader was not followed")
            attempt.callback("ok")
            self.successResultOf(d)
        learnt = [f"n{i}:1" for i in range(total - (MAX_LEARNED_ADDRESSES - len(ADDRESSES)), total)]
        self.assertEqual(self.caller.addresses, [*ADDRESSES, *learnt])

    def test_retryable_error_backs_off_and_rotates(self) -> None:
        d = self.caller.call("updatefile", {})
        self.pool.last()[1].errback(errors.Crashed("down"))
        self.assertEqual(len(self.pool.calls), 1, "retried without a backoff")
        self.clock.advance(0.05)  # the first backoff step is at most base (0.02 s)
        address, attempt = self.pool.last()
        self.assertEqual((address, len(self.pool.calls)), ("b:1", 2))
        attempt.callback(1)
        self.assertEqual(self.successResultOf(d), 1)

    def test_non_retryable_error_fails_at_once(self) -> None:
        d = self.caller.call("updatefile", {})
        self.pool.last()[1].errback(errors.VersionMismatch("stale", current=3))
        self.assertEqual(self.failureResultOf(d, errors.VersionMismatch).value.current, 3)
        self.assertEqual(len(self.pool.calls), 1)

    def test_gives_up_with_timeout_naming_the_last_error(self) -> None:
        d = self.caller.call("updatefile", {})
        # Bounded: every attempt is answered Unavailable until the deadline.
        for _ in range(1000):
            if d.called:
                break
            _, attempt = self.pool.last()
            if not attempt.called:
                attempt.errback(errors.Unavailable("refused"))
            self.clock.advance(0.1)
        failure = self.failureResultOf(d, errors.Timeout)
        self.assertIn("refused", str(failure.value))
        self.assertGreaterEqual(self.clock.seconds(), 5.0)

    def test_cancel_cancels_the_attempt_in_flight(self) -> None:
        d = self.caller.call("updatefile", {})
        _, attempt = self.pool.last()
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertTrue(attempt.called)

    def test_cancel_during_retries_stops_them(self) -> None:
        d = self.caller.call("updatefile", {})
        self.pool.last()[1].errback(errors.Crashed("down"))
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.clock.advance(10)
        self.assertEqual(len(self.pool.calls), 1, "a cancelled call went on retrying")


@implementer(IPipelinedPool)
class ConnectedPool(ScriptedPool):
    """A pool with an established connection: ``call_into`` hands the reply
    sink to the test instead of making a Deferred."""

    def __init__(self) -> None:
        super().__init__()
        self.sinks: list[tuple[str, Any]] = []
        self.forgotten: list[int] = []

    def call_into(self, address: str, sink: Any, method: str, args: dict[str, Any], timeout: float) -> Any:
        self.sinks.append((address, sink))
        return self, len(self.sinks)

    def notify(self, address: str, method: str, args: dict[str, Any] | None = None) -> bool:
        return False

    def forget(self, call_id: int) -> None:
        self.forgotten.append(call_id)


class LeaderCallerFastPathTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.pool = ConnectedPool()
        self.caller = LeaderCaller(
            self.pool, ADDRESSES, self.clock, timeout=5.0, attempt_timeout=1.0, rng=random.Random(1)
        )

    def test_reply_through_the_sink_answers_the_call(self):
        d = self.caller.call("updatefile", {})
        [(address, sink)] = self.pool.sinks
        self.assertEqual((address, self.pool.calls), ("a:1", []))
        self.assertNoResult(d)
        sink.callback(3)
        self.assertEqual(self.successResultOf(d), 3)
        self.assertEqual(self.caller.leader, "a:1")

    def test_retryable_error_through_the_sink_goes_on_to_retries(self):
        d = self.caller.call("updatefile", {})
        self.pool.sinks[0][1].errback(errors.NotLeader("no", leader="b:1"))
        self.assertNoResult(d)
        address, attempt = self.pool.last()  # the retry loop uses plain calls
        self.assertEqual(address, "b:1")
        attempt.callback(4)
        self.assertEqual(self.successResultOf(d), 4)

    def test_non_retryable_error_through_the_sink_fails_the_call(self):
        d = self.caller.call("updatefile", {})
        self.pool.sinks[0][1].errback(errors.VersionMismatch("stale", current=2))
        self.assertEqual(self.failureResultOf(d, errors.VersionMismatch).value.current, 2)

    def test_cancel_forgets_the_call_on_the_connection(self):
        d = self.caller.call("updatefile", {})
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(self.pool.forgotten, [1])
        # A reply racing the cancel changes nothing (and raises nothing).
        self.pool.sinks[0][1].callback(5)
        self.pool.sinks[0][1].errback(errors.Crashed("late"))
        self.assertEqual(self.caller.leader, None)
