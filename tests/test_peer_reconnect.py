"""Raft peers reconnect promptly (issue 12, item 4): a replica's Raft
traffic goes through a pool of its own whose reconnect backoff stops at the
heartbeat interval, so a restarted follower is reached at the next
heartbeat, while client calls keep the client pool's longer backoff."""

from __future__ import annotations

from pathlib import Path

from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from surfshard.config import load_config
from surfshard.metadata.service import MetadataService
from surfshard.net.pool import _Peer
from tests.procs import write_toml_config


class PeerPoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        directory = Path(self.mktemp())
        config = write_toml_config(directory, [1, 2, 3], raft={"tick_ms": 50, "heartbeat_ticks": 2})
        self.clock = Clock()
        self.service = MetadataService(load_config(config), 1, 0, self.clock)
        self.addCleanup(self.service.storage.close)

    def test_raft_messages_use_their_own_pool(self) -> None:
        self.assertIs(self.service.transport.pool, self.service.peer_pool)
        self.assertIsNot(self.service.peer_pool, self.service.pool)

    def test_a_peer_down_for_long_is_retried_within_a_heartbeat(self) -> None:
        heartbeat = 0.05 * 2
        for pool, bound in ((self.service.peer_pool, heartbeat), (self.service.pool, 5.0)):
            peer = _Peer("127.0.0.1:1")
            for _ in range(20):  # a follower down for many reconnect attempts
                pool._note_failure(peer, Failure(ConnectionRefusedError()))
            wait = peer.retry_at - self.clock.seconds()
            self.assertLessEqual(wait, bound)
        # The client pool does back off further than a heartbeat: the split matters.
        self.assertGreater(self.service.pool.backoff_max, heartbeat)
