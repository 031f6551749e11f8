"""One contract for every RPC pool: ``RpcClientPool`` over loopback sockets
and ``SimRpcPool`` over the simulated network run the same tests, each
starting with ``verifyObject``, so the fake that most tests use cannot drift
from the real part (the pattern of Twisted's ``test_testing`` and Tahoe's
``test_istorageserver``)."""

from __future__ import annotations

import random
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from surfshard import errors
from surfshard.net.interfaces import IPipelinedPool, IRpcPool
from surfshard.net.methods import CallContext, MethodTable
from surfshard.net.pool import RpcClientPool
from surfshard.net.schema import Arg
from surfshard.net.server import RpcServerFactory
from surfshard.testing.simrpc import SimRpcNetwork

#: An address nothing listens on (port 1 is reserved; nobody serves it here).
NOWHERE = "127.0.0.1:1"


def table() -> MethodTable:
    t = MethodTable("contract")
    t.add("echo", lambda value: value, [Arg("value", str)])

    def refuse(current: int) -> None:
        raise errors.VersionMismatch("no", current=current)

    t.add("refuse", refuse, [Arg("current", int)])

    def hang_up(context: CallContext) -> bool:
        context.transport.loseConnection()
        return True

    t.add("hang_up", hang_up, pass_context=True)
    return t


class Sink:
    """A ReplySink that records what it got."""

    def __init__(self) -> None:
        self.outcome: tuple[bool, Any] | None = None

    @property
    def called(self) -> bool:
        return self.outcome is not None

    def callback(self, result: Any) -> None:
        self.outcome = (True, result)

    def errback(self, error: BaseException) -> None:
        self.outcome = (False, error)


class PoolContractMixin:
    """Subclasses set ``self.pool`` and ``self.address`` in ``setUp`` and
    define ``settle(d)``: a Deferred that fires once ``d`` has fired."""

    pool: Any
    address: str

    def settle(self, d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        raise NotImplementedError

    def wait_for(self, predicate: Any) -> defer.Deferred[None]:
        raise NotImplementedError

    def test_provides_the_interfaces(self) -> None:
        self.assertTrue(verifyObject(IRpcPool, self.pool))
        self.assertTrue(verifyObject(IPipelinedPool, self.pool))

    @defer.inlineCallbacks
    def test_call_answers(self) -> Any:
        result = yield self.settle(self.pool.call(self.address, "echo", {"value": "hi"}, timeout=5))
        self.assertEqual(result, "hi")

    @defer.inlineCallbacks
    def test_error_reply_is_the_typed_error(self) -> Any:
        d = self.pool.call(self.address, "refuse", {"current": 7}, timeout=5)
        error = yield self.assertFailure(self.settle(d), errors.VersionMismatch)
        self.assertEqual(error.current, 7)

    @defer.inlineCallbacks
    def test_unknown_method_and_bad_args_are_refused(self) -> Any:
        yield self.assertFailure(
            self.settle(self.pool.call(self.address, "nope", {}, timeout=5)), errors.UnknownMethod
        )
        d = self.pool.call(self.address, "echo", {"value": 3}, timeout=5)
        yield self.assertFailure(self.settle(d), errors.BadRequest)

    @defer.inlineCallbacks
    def test_nobody_there_is_unavailable(self) -> Any:
        d = self.pool.call(NOWHERE, "echo", {"value": "x"}, timeout=5)
        yield self.assertFailure(self.settle(d), errors.Unavailable, errors.Timeout)

    def test_call_into_without_a_connection_sends_nothing(self) -> None:
        self.assertIsNone(self.pool.call_into(self.address, Sink(), "echo", {"value": "x"}, 5))

    @defer.inlineCallbacks
    def test_call_into_on_a_connection_answers_the_sink(self) -> Any:
        yield self.settle(self.pool.call(self.address, "echo", {"value": "connect"}, timeout=5))
        ok_sink, error_sink = Sink(), Sink()
        sent = self.pool.call_into(self.address, ok_sink, "echo", {"value": "fast"}, 5)
        self.assertIsNotNone(sent)
        self.assertIsNotNone(self.pool.call_into(self.address, error_sink, "refuse", {"current": 2}, 5))
        yield self.wait_for(lambda: ok_sink.called and error_sink.called)
        self.assertEqual(ok_sink.outcome, (True, "fast"))
        self.assertIsInstance(error_sink.outcome[1], errors.VersionMismatch)

    @defer.inlineCallbacks
    def test_forget_drops_the_reply(self) -> Any:
        yield self.settle(self.pool.call(self.address, "echo", {"value": "connect"}, timeout=5))
        forgotten, later = Sink(), Sink()
        connection, call_id = self.pool.call_into(self.address, forgotten, "echo", {"value": "a"}, 5)
        connection.forget(call_id)
        self.pool.call_into(self.address, later, "echo", {"value": "b"}, 5)
        yield self.wait_for(lambda: later.called)
        self.assertFalse(forgotten.called)

    @defer.inlineCallbacks
    def test_notify_is_one_way(self) -> Any:
        yield self.settle(self.pool.call(self.address, "echo", {"value": "connect"}, timeout=5))
        self.assertTrue(self.pool.notify(self.address, "echo", {"value": "one way"}))
        result = yield self.settle(self.pool.call(self.address, "echo", {"value": "after"}, timeout=5))
        self.assertEqual(result, "after")

    @defer.inlineCallbacks
    def test_a_lost_connection_is_reported_with_its_address(self) -> Any:
        lost: list[str] = []

        def broken(_address: str) -> None:
            raise RuntimeError("observer bug")

        self.pool.on_connection_lost(broken)  # logged; the next observer still hears
        self.pool.on_connection_lost(lost.append)
        yield self.settle(self.pool.call(self.address, "echo", {"value": "connect"}, timeout=5))
        self.pool.notify(self.address, "hang_up", {})
        yield self.wait_for(lambda: lost)
        self.assertEqual(lost, [self.address])
        # Reconnecting works, and a pool that closes its own connections
        # reports nothing.
        yield self.settle(self.pool.call(self.address, "echo", {"value": "again"}, timeout=5))
        yield self.settle(self.pool.close())
        yield self.wait_for(lambda: True)
        self.assertEqual(lost, [self.address])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    @defer.inlineCallbacks
    def test_closed_pool_refuses(self) -> Any:
        yield self.settle(self.pool.close())
        d = self.pool.call(self.address, "echo", {"value": "x"}, timeout=5)
        yield self.assertFailure(self.settle(d), errors.Unavailable)
        self.assertFalse(self.pool.notify(self.address, "echo", {"value": "x"}))


class RealPoolContractTests(PoolContractMixin, TestCase):
    def setUp(self) -> None:
        self.port = reactor.listenTCP(0, RpcServerFactory(table(), reactor), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.address = f"127.0.0.1:{self.port.getHost().port}"
        self.pool = RpcClientPool(reactor, rng=random.Random(1))
        self.addCleanup(self.pool.close)

    def settle(self, d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        return d

    @defer.inlineCallbacks
    def wait_for(self, predicate: Any) -> Any:
        from twisted.internet.task import deferLater

        for _ in range(500):  # bounded: 5 s
            if predicate():
                return
            yield deferLater(reactor, 0.01, lambda: None)
        self.fail("condition not reached within 5 s")


class SimPoolContractTests(PoolContractMixin, TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.net = SimRpcNetwork(self.clock, seed=1)
        self.address = "127.0.0.1:7000"  # a name on the simulated network: no socket is opened
        self.net.register(self.address, table())
        self.pool = self.net.pool("client")

    def _pump(self, predicate: Any) -> None:
        for _ in range(2000):  # bounded: 10 simulated seconds
            if predicate():
                return
            self.clock.advance(0.005)

    def settle(self, d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        self._pump(lambda: d.called)
        return d

    def wait_for(self, predicate: Any) -> defer.Deferred[None]:
        self._pump(predicate)
        if not predicate():
            self.fail("condition not reached within 10 simulated seconds")
        return defer.succeed(None)
