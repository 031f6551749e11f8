"""Tests for surfshard.replica.loops: a background loop goes on after its
function fails (a watcher or migrator must not stop for good on one bug)."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import Logger, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from surfshard.replica.loops import polling_loop


class PollingLoopTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def test_a_raising_poll_is_logged_and_the_loop_goes_on(self) -> None:
        clock = Clock()
        calls: list[int] = []

        def poll() -> None:
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("a bug in one poll")

        loop = polling_loop(poll, clock, 0.1, Logger(), "test poll")
        for _ in range(5):
            clock.advance(0.1)
        self.assertEqual(len(calls), 5)
        self.assertTrue(loop.running)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        loop.stop()

    def test_a_failing_deferred_is_logged_and_the_loop_goes_on(self) -> None:
        clock = Clock()
        calls: list[int] = []

        def poll() -> defer.Deferred[None]:
            calls.append(1)
            return defer.fail(ValueError("async bug")) if len(calls) == 1 else defer.succeed(None)

        loop = polling_loop(poll, clock, 0.1, Logger(), "test poll")
        for _ in range(3):
            clock.advance(0.1)
        self.assertEqual(len(calls), 3)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        loop.stop()
