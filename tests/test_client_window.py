"""The client keeps its updates in flight to one shard within the server's
dedup window by itself (issue 19, item 6): more could commit out of order
past the window and be refused as stale."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from client.cluster import ClusterClient
from surfshard.config import load_config
from surfshard.keyspace import shard_of
from surfshard.metadata.state import DEDUP_WINDOW


class WindowTests(SynchronousTestCase):
    def test_at_most_a_window_in_flight_per_shard_in_call_order(self) -> None:
        directory = Path(self.mktemp())
        directory.mkdir()
        config = directory / "c.toml"
        config.write_text(
            '[cluster]\nname = "w"\nshards = 4\ndata_dir = "d"\n[groups.1]\nnodes = ["127.0.0.1:1"]\n'
        )
        client = ClusterClient(load_config(config), Clock(), pool=object())  # type: ignore[arg-type]
        in_flight: list[tuple[str, defer.Deferred[Any]]] = []
        seqs: list[int] = []

        def routed(name: str, call: Any) -> defer.Deferred[Any]:
            d: defer.Deferred[Any] = defer.Deferred()
            in_flight.append((name, d))

            class Recorder:
                def updatefile(
                    self, name: str, version: int, hashlist: list[str], seq: int, timeout: Any
                ) -> None:
                    seqs.append(seq)

            call(Recorder(), None)
            return d

        client._routed = routed  # type: ignore[method-assign]
        same = [f"f{i}" for i in range(400) if shard_of(f"f{i}", 4) == 0][:100]
        other = next(f"g{i}" for i in range(400) if shard_of(f"g{i}", 4) == 1)
        results = [client.updatefile(name, 1, []) for name in same]
        self.assertEqual(len(in_flight), DEDUP_WINDOW)
        client.updatefile(other, 1, [])  # another shard is not held up
        self.assertEqual(len(in_flight), DEDUP_WINDOW + 1)
        # Finishing the newest first lets the next in line go, in call order.
        name, d = in_flight.pop(DEDUP_WINDOW - 1)
        d.callback(1)
        self.assertEqual(in_flight[-1][0], same[DEDUP_WINDOW])
        self.assertEqual(self.successResultOf(results[DEDUP_WINDOW - 1]), 1)
        # Numbers are taken when an update may go: increasing in call order.
        self.assertEqual(seqs, sorted(seqs))
