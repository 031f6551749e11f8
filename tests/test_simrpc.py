"""SimRpcNetwork: the native RPC protocol in simulated time.

Everything runs on a ``Clock`` advanced in small steps; what a test expects
of timing (a reply never arrives synchronously, a dropped call fails exactly
at its timeout, a refused one shortly after the call) is what the real
``RpcClientPool`` does on loopback.
"""

from __future__ import annotations

import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from surfshard.errors import (
    BadRequest,
    Internal,
    NotLeader,
    Timeout,
    Unavailable,
    UnknownMethod,
    VersionMismatch,
)
from surfshard.net.methods import CallContext, MethodTable
from surfshard.net.schema import Arg, Value
from surfshard.testing.simrpc import SimRpcNetwork, resolve

STEP = 0.001


def advance(clock: Clock, seconds: float, step: float = STEP) -> None:
    for _ in range(max(1, math.ceil(seconds / step - 1e-9))):
        clock.advance(step)


class Service:
    """A small service whose handlers record what they saw."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.seen: list[Any] = []
        self.kept: list[Any] = []
        self.waiting: list[Deferred[Any]] = []
        self.cancelled = 0
        self.peers: list[str] = []

    def table(self) -> MethodTable:
        t = MethodTable(service="test")
        t.add(
            "echo",
            self.echo,
            [Arg("value", Value((dict, list, str, int, float, bool, bytes), nullable=True))],
        )
        t.add("put", self.put, [Arg("name", str, min_len=1), Arg("version", int, min=1)])
        t.add("keep", self.keep)
        t.add("not_leader", self.not_leader)
        t.add("mismatch", self.mismatch)
        t.add("boom", self.boom)
        t.add("slow", self.slow, [Arg("seconds", float, min=0.0)])
        t.add("wait", self.wait)
        t.add("whoami", self.whoami, pass_context=True)
        return t

    def echo(self, value: Any) -> Any:
        self.seen.append(value)
        return value

    def put(self, name: str, version: int) -> int:
        self.seen.append((name, version))
        return version

    def keep(self) -> list[int]:
        # Returned and kept: mutating it afterwards must not reach the caller.
        kept = [1, 2, 3]
        self.kept.append(kept)
        return kept

    def not_leader(self) -> None:
        raise NotLeader("not me", leader="n2:1")

    def mismatch(self) -> None:
        raise VersionMismatch("stale", current=7)

    def boom(self) -> None:
        raise ValueError("secret internals")

    def slow(self, seconds: float) -> Deferred[str]:
        d: Deferred[str] = Deferred()
        self.clock.callLater(seconds, d.callback, "done")
        return d

    def wait(self) -> Deferred[None]:
        def cancelled(_d: Deferred[None]) -> None:
            self.cancelled += 1

        d: Deferred[None] = Deferred(cancelled)
        self.waiting.append(d)
        return d

    def whoami(self, context: CallContext) -> str:
        self.peers.append(context.peer)
        return context.peer


class SimRpcTestBase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.net = SimRpcNetwork(self.clock, seed=1)
        self.service = Service(self.clock)
        self.net.register("s1:1", self.service.table())
        self.pool = self.net.pool("client")

    def outcome(self, d: Deferred[Any], within: float = 0.1) -> tuple[bool, Any]:
        limit = self.clock.seconds() + within
        while not d.called and self.clock.seconds() < limit:
            self.clock.advance(STEP)
        self.assertTrue(d.called, f"no outcome within {within}s")
        return resolve(d)

    def failure_of(self, d: Deferred[Any], within: float = 0.1) -> Exception:
        ok, value = self.outcome(d, within)
        self.assertFalse(ok, f"expected a failure, got {value!r}")
        return value


class RoundTripTests(SimRpcTestBase):
    def test_args_and_results_cross_as_copies(self) -> None:
        value = {"a": [1, 2, {"b": "c"}], "bytes": b"\x00\x01", "f": 1.5}
        d = self.pool.call("s1:1", "echo", {"value": value}, timeout=1.0)
        value["a"].append("mutated after the call")  # the wire took a copy when sent
        ok, result = self.outcome(d)
        self.assertTrue(ok)
        self.assertEqual(result, {"a": [1, 2, {"b": "c"}], "bytes": b"\x00\x01", "f": 1.5})
        self.assertIsNot(self.service.seen[0], value)
        self.assertIsNot(result, self.service.seen[0])

    def test_result_is_not_shared_with_the_server(self) -> None:
        ok, result = self.outcome(self.pool.call("s1:1", "keep", {}, timeout=1.0))
        self.assertTrue(ok)
        self.service.kept[0].append(4)
        self.assertEqual(result, [1, 2, 3])

    def test_tuples_arrive_as_lists_as_on_the_wire(self) -> None:
        ok, result = self.outcome(self.pool.call("s1:1", "echo", {"value": (1, 2)}, timeout=1.0))
        self.assertEqual((ok, result), (True, [1, 2]))
        self.assertEqual(self.service.seen, [[1, 2]])

    def test_reply_is_never_synchronous_and_within_the_delay_range(self) -> None:
        start = self.clock.seconds()
        d = self.pool.call("s1:1", "put", {"name": "f", "version": 1}, timeout=1.0)
        self.assertFalse(d.called)
        self.assertEqual(self.service.seen, [])  # the request is in flight too
        ok, result = self.outcome(d)
        self.assertEqual((ok, result), (True, 1))
        elapsed = self.clock.seconds() - start
        low, high = self.net.delay
        self.assertGreaterEqual(elapsed, 2 * low)
        self.assertLessEqual(elapsed, 2 * high + 2 * STEP)

    def test_deferred_handler_result(self) -> None:
        d = self.pool.call("s1:1", "slow", {"seconds": 0.5}, timeout=1.0)
        advance(self.clock, 0.4)
        self.assertFalse(d.called)
        self.assertEqual(self.outcome(d, 0.2), (True, "done"))

    def test_handler_sees_the_pool_name_as_peer(self) -> None:
        self.assertEqual(self.outcome(self.pool.call("s1:1", "whoami", {}, timeout=1.0)), (True, "client"))
        self.assertEqual(self.service.peers, ["client"])

    @settings(deadline=None, max_examples=40)
    @given(
        st.recursive(
            st.none()
            | st.booleans()
            | st.integers(min_value=-(2**64) + 1, max_value=2**64 - 1)
            | st.floats(allow_nan=False)
            | st.text(max_size=20)
            | st.binary(max_size=20),
            lambda children: (
                st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
            ),
            max_leaves=20,
        )
    )
    def test_any_wire_value_round_trips(self, value: Any) -> None:
        clock = Clock()
        net = SimRpcNetwork(clock, seed=3)
        service = Service(clock)
        net.register("s:1", service.table())
        d = net.pool("c").call("s:1", "echo", {"value": value}, timeout=1.0)
        advance(clock, 0.02)
        ok, result = resolve(d)
        self.assertTrue(ok, result)
        self.assertEqual(result, value if not isinstance(value, tuple) else list(value))


class ValidationTests(SimRpcTestBase):
    def test_unknown_method(self) -> None:
        error = self.failure_of(self.pool.call("s1:1", "nope", {}, timeout=1.0))
        self.assertIsInstance(error, UnknownMethod)

    def test_bad_args_are_refused_before_the_handler(self) -> None:
        cases = [
            ({"name": "f"}, "args.version: is required"),
            ({"name": "f", "version": 0}, "args.version: must be >= 1"),
            ({"name": "f", "version": True}, "args.version: expected int"),
            ({"name": "", "version": 1}, "args.name: length 0"),
            ({"name": "f", "version": 1, "extra": 1}, "unknown field(s) 'extra'"),
        ]
        for args, expected in cases:
            error = self.failure_of(self.pool.call("s1:1", "put", args, timeout=1.0))
            self.assertIsInstance(error, BadRequest, args)
            self.assertIn(expected, error.message, args)
        self.assertEqual(self.service.seen, [])

    def test_args_that_are_not_a_map(self) -> None:
        error = self.failure_of(self.pool.call("s1:1", "put", ["f", 1], timeout=1.0))  # type: ignore[arg-type]
        self.assertIsInstance(error, BadRequest)

    def test_unencodable_args_fail_at_once(self) -> None:
        d = self.pool.call("s1:1", "echo", {"value": object()}, timeout=1.0)
        self.assertTrue(d.called)
        self.assertIsInstance(self.failure_of(d), BadRequest)


class ErrorTests(SimRpcTestBase):
    def test_typed_errors_with_details(self) -> None:
        error = self.failure_of(self.pool.call("s1:1", "not_leader", {}, timeout=1.0))
        self.assertIsInstance(error, NotLeader)
        self.assertEqual(error.leader, "n2:1")
        error = self.failure_of(self.pool.call("s1:1", "mismatch", {}, timeout=1.0))
        self.assertIsInstance(error, VersionMismatch)
        self.assertEqual(error.current, 7)

    def test_unexpected_exception_becomes_internal_without_details(self) -> None:
        error = self.failure_of(self.pool.call("s1:1", "boom", {}, timeout=1.0))
        self.assertIsInstance(error, Internal)
        self.assertNotIn("secret", str(error))
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)


class FaultTests(SimRpcTestBase):
    def test_dropped_request_times_out_at_the_timeout(self) -> None:
        self.net.set_faults(drop_request=1.0)
        start = self.clock.seconds()
        d = self.pool.call("s1:1", "put", {"name": "f", "version": 1}, timeout=0.5)
        advance(self.clock, 0.49)
        self.assertFalse(d.called)
        error = self.failure_of(d, 0.02)
        self.assertIsInstance(error, Timeout)
        self.assertAlmostEqual(self.clock.seconds() - start, 0.5, delta=2 * STEP)
        self.assertEqual(self.service.seen, [])
        self.assertEqual(self.net.requests_dropped, 1)

    def test_dropped_reply_runs_the_handler_but_times_out(self) -> None:
        self.net.set_faults(drop_reply=1.0)
        error = self.failure_of(self.pool.call("s1:1", "put", {"name": "f", "version": 1}, timeout=0.3), 0.5)
        self.assertIsInstance(error, Timeout)
        self.assertEqual(self.service.seen, [("f", 1)])
        self.assertEqual(self.net.replies_dropped, 1)

    def test_drop_rates_are_roughly_honoured(self) -> None:
        self.net.set_faults(drop_request=0.3)
        calls = [self.pool.call("s1:1", "put", {"name": "f", "version": 1}, timeout=0.2) for _ in range(400)]
        advance(self.clock, 0.3)
        failed = sum(1 for d in calls if not resolve(d)[0])
        self.assertTrue(80 <= failed <= 160, failed)

    def test_unknown_address_is_unavailable_shortly(self) -> None:
        d = self.pool.call("nobody:1", "put", {"name": "f", "version": 1}, timeout=5.0)
        self.assertFalse(d.called)
        error = self.failure_of(d, 0.05)
        self.assertIsInstance(error, Unavailable)

    def test_refusal_with_a_tiny_timeout_is_a_timeout(self) -> None:
        error = self.failure_of(self.pool.call("nobody:1", "put", {}, timeout=0.0005), 0.05)
        self.assertIsInstance(error, Timeout)

    def test_partition_confines_listed_endpoints_only(self) -> None:
        self.net.register("s2:1", Service(self.clock).table())
        other = self.net.pool("s2:1")  # s2's own pool, as a replica calling a peer
        self.net.partition(["s1:1"], ["s2:1"])
        self.assertIsInstance(self.failure_of(other.call("s1:1", "put", {}, timeout=1.0)), Unavailable)
        # The client is in no group: it still reaches both sides.
        self.assertTrue(self.outcome(self.pool.call("s1:1", "whoami", {}, timeout=1.0))[0])
        self.assertTrue(self.outcome(self.pool.call("s2:1", "whoami", {}, timeout=1.0))[0])
        self.net.heal()
        self.assertTrue(self.outcome(other.call("s1:1", "whoami", {}, timeout=1.0))[0])

    def test_isolate_and_reconnect(self) -> None:
        self.net.isolate("client")
        self.assertIsInstance(self.failure_of(self.pool.call("s1:1", "whoami", {}, timeout=1.0)), Unavailable)
        self.net.reconnect("client")
        self.assertTrue(self.outcome(self.pool.call("s1:1", "whoami", {}, timeout=1.0))[0])

    def test_one_way_cut_loses_the_reply(self) -> None:
        self.net.cut("s1:1", "client", both_ways=False)
        error = self.failure_of(self.pool.call("s1:1", "put", {"name": "f", "version": 2}, timeout=0.2), 0.3)
        self.assertIsInstance(error, Timeout)
        self.assertEqual(self.service.seen, [("f", 2)])

    def test_partition_eats_messages_in_flight(self) -> None:
        d = self.pool.call("s1:1", "put", {"name": "f", "version": 1}, timeout=0.2)
        self.net.isolate("s1:1")  # after sending, before delivery
        self.assertIsInstance(self.failure_of(d, 0.3), Timeout)
        self.assertEqual(self.service.seen, [])

    def test_server_death_loses_connections_and_cancels_handlers(self) -> None:
        d = self.pool.call("s1:1", "wait", {}, timeout=5.0)
        advance(self.clock, 0.02)
        self.assertEqual(len(self.service.waiting), 1)
        self.net.unregister("s1:1")
        self.assertEqual(self.service.cancelled, 1)
        error = self.failure_of(d, 0.05)
        self.assertIsInstance(error, Unavailable)
        self.assertIsInstance(self.failure_of(self.pool.call("s1:1", "whoami", {}, timeout=1.0)), Unavailable)

    def test_reregistering_is_a_restart(self) -> None:
        d = self.pool.call("s1:1", "wait", {}, timeout=5.0)
        advance(self.clock, 0.02)
        fresh = Service(self.clock)
        self.net.register("s1:1", fresh.table())
        self.assertIsInstance(self.failure_of(d, 0.05), Unavailable)
        self.assertTrue(self.outcome(self.pool.call("s1:1", "whoami", {}, timeout=1.0))[0])
        self.assertEqual(fresh.peers, ["client"])

    def test_cancel_forgets_the_call(self) -> None:
        d = self.pool.call("s1:1", "slow", {"seconds": 0.05}, timeout=1.0)
        d.cancel()
        self.assertIsInstance(self.failure_of(d), CancelledError)
        advance(self.clock, 0.2)  # the late reply is ignored, not an error

    def test_closed_pool(self) -> None:
        d = self.pool.call("s1:1", "wait", {}, timeout=5.0)
        advance(self.clock, 0.02)
        closed = self.pool.close()
        self.assertTrue(closed.called)
        self.assertIsInstance(self.failure_of(d), Unavailable)
        self.assertEqual(self.service.cancelled, 1)
        self.assertIsInstance(self.failure_of(self.pool.call("s1:1", "whoami", {})), Unavailable)

    def test_bad_fault_settings_are_refused(self) -> None:
        with self.assertRaises(ValueError):
            self.net.set_faults(drop_reply=1.5)
        with self.assertRaises(ValueError):
            self.net.set_faults(delay=(0.2, 0.1))


class DeterminismTests(SynchronousTestCase):
    def arrival_times(self, seed: int) -> list[float]:
        clock = Clock()
        net = SimRpcNetwork(clock, seed, drop_reply=0.2)
        net.register("s:1", Service(clock).table())
        pool = net.pool("c")
        times: list[float] = []
        for i in range(20):
            d = pool.call("s:1", "put", {"name": "f", "version": i + 1}, timeout=0.1)
            d.addCallbacks(lambda _r: times.append(round(clock.seconds(), 6)), lambda _f: times.append(-1.0))
        advance(clock, 0.2)
        return times

    def test_same_seed_same_run(self) -> None:
        self.assertEqual(self.arrival_times(5), self.arrival_times(5))
        self.assertNotEqual(self.arrival_times(5), self.arrival_times(6))
