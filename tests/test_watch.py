"""``surfshard sync --watch``'s long poll on the change feed
(``client.watch.ServerPoll``), in simulated time: the server is never out
of sight between syncs, however long the interval."""

from __future__ import annotations

import threading
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from client.watch import RETRY_MAX, ServerPoll, retry_pause
from surfshard import errors


class ServerPollTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.wake = threading.Event()
        self.polls: list[tuple[Any, float, defer.Deferred[bool]]] = []
        self.server = ServerPoll(self.clock, self.wait, self.wake)

    def wait(self, cursor: Any, seconds: float) -> defer.Deferred[bool]:
        d: defer.Deferred[bool] = defer.Deferred()
        self.polls.append((cursor, seconds, d))
        return d

    def test_a_poll_that_ends_with_no_change_is_made_again_with_the_same_cursor(self) -> None:
        # Before, the watch then slept out its interval (ten minutes with
        # --watch 600) blind to the server.
        self.server.start("c1", 600.0)
        self.assertEqual([(c, s) for c, s, _ in self.polls], [("c1", 600.0)])
        for k in range(3):
            self.polls[-1][2].callback(False)
            self.assertEqual(len(self.polls), 2 + k)
            self.assertEqual(self.polls[-1][:2], ("c1", ServerPoll.SECONDS))
            self.assertTrue(self.server.out.is_set())
            self.assertFalse(self.wake.is_set())
        self.polls[-1][2].callback(True)
        self.assertTrue(self.wake.is_set())
        self.assertFalse(self.server.out.is_set())
        self.assertEqual(len(self.polls), 4)  # the next sync starts the next one

    def test_one_poll_out_at_a_time(self) -> None:
        self.server.start("c1", 60.0)
        self.server.start("c2", 60.0)  # a local change woke the watch meanwhile
        self.assertEqual(len(self.polls), 1)
        self.polls[0][2].callback(True)
        self.server.start("c2", 60.0)
        self.assertEqual([c for c, _, _ in self.polls], ["c1", "c2"])

    def test_a_failed_poll_wakes_the_watch_after_a_pause_not_in_a_loop(self) -> None:
        self.server.start("c1", 60.0)
        self.polls[0][2].errback(errors.Unavailable("no leader"))
        self.assertFalse(self.server.out.is_set())
        self.assertFalse(self.wake.is_set())
        self.clock.advance(ServerPoll.RETRY)
        self.assertTrue(self.wake.is_set())
        self.assertEqual(len(self.polls), 1)

    def test_a_stopped_watch_polls_no_more(self) -> None:
        self.server.start("c1", 60.0)
        self.server.stop()
        self.polls[0][2].callback(False)
        self.assertEqual(len(self.polls), 1)
        self.assertFalse(self.server.out.is_set())
        self.server.start("c1", 60.0)
        self.assertEqual(len(self.polls), 1)
        self.server = ServerPoll(self.clock, self.wait, self.wake)
        self.server.start("c2", 60.0)
        self.server.stop()
        self.polls[-1][2].errback(errors.Unavailable("closed"))
        self.clock.advance(ServerPoll.RETRY)
        self.assertFalse(self.wake.is_set())


class RetryTests(SynchronousTestCase):
    def test_a_failing_watch_tries_less_often_up_to_a_bound(self) -> None:
        self.assertEqual([retry_pause(k, 600.0) for k in range(1, 9)], [1, 2, 4, 8, 16, 32, 60, 60])
        self.assertEqual(retry_pause(10_000, 600.0), RETRY_MAX)  # no overflow however long it lasts
        self.assertEqual([retry_pause(k, 5.0) for k in (1, 3, 9)], [1, 4, 5])  # never past the interval
        self.assertEqual(retry_pause(1, 0.2), 1.0)  # nor in a loop with a tiny one
