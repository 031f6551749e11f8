"""Prometheus metrics at ``/metrics`` (issue 14, item 1), parsed by
``prometheus_client``'s own text parser: a real 3-node group under writes,
and a block store."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from surfshard import errors
from surfshard.blocks.store import BlockStore
from surfshard.observe.metrics import node_registry
from tests.procs import Cluster, NativeClient, wait_until

H = "a" * 64


def scrape(address: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        assert reply.headers["content-type"].startswith("text/plain")
        text = reply.read().decode("utf-8")
    return parse(text)


def parse(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "node"))
            out.setdefault(sample.name, {})[labels] = sample.value
    return out


def value(metrics: dict[str, Any], name: str, **labels: str) -> float:
    return metrics[name][tuple(sorted(labels.items()))]


class GroupMetricsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.cluster = Cluster.toml(Path(self.mktemp()), 3)
        self.addCleanup(self.cluster.cleanup)

    def leader(self) -> str:
        def find() -> str | None:
            for address in self.cluster.addresses:
                try:
                    with NativeClient(address, timeout=2.0) as c:
                        if c.call("is_leader"):
                            return address
                except Exception:
                    continue
            return None

        return wait_until(find, 30.0, 0.1, "a leader")

    def test_names_present_and_moving_under_load(self) -> None:
        with self.cluster.logs_on_failure():
            self.cluster.start_all()
            leader = self.leader()
            before = scrape(leader)
            for name in (
                "surfshard_raft_term",
                "surfshard_raft_role",
                "surfshard_raft_commit_index",
                "surfshard_raft_applied_index",
                "surfshard_raft_voters",
                "surfshard_raft_learners",
                "surfshard_raft_proposals_total",
                "surfshard_raft_elections_total",
                "surfshard_raft_leader_changes_total",
                "surfshard_raft_append_seconds_bucket",
                "surfshard_raft_fsync_seconds_bucket",
                "surfshard_raft_snapshot_seconds_count",
                "surfshard_raft_snapshot_bytes_bucket",
                "surfshard_rpc_requests_total",
                "surfshard_rpc_connections",
                "surfshard_metadata_files",
                "surfshard_metadata_dedup_sessions",
                "surfshard_metadata_batches_total",
                "surfshard_shard_moves_in_progress",
            ):
                self.assertIn(name, before, sorted(before))
            self.assertEqual(value(before, "surfshard_raft_role", role="leader"), 1.0)
            with NativeClient(leader, timeout=10.0) as c:
                for k in range(50):
                    c.call("updatefile", {"name": f"m{k}", "version": 1, "hashlist": [H]})
                try:
                    c.call("nonesuch")
                except Exception:
                    pass
            after = scrape(leader)
            self.assertGreaterEqual(
                value(after, "surfshard_raft_proposals_total")
                - value(before, "surfshard_raft_proposals_total"),
                50,
            )
            self.assertGreaterEqual(
                value(after, "surfshard_rpc_requests_total", method="updatefile")
                - before["surfshard_rpc_requests_total"].get((("method", "updatefile"),), 0.0),
                50,
            )
            self.assertEqual(
                value(after, "surfshard_rpc_errors_total", method="-", code="UNKNOWN_METHOD"), 1.0
            )
            self.assertGreater(
                value(after, "surfshard_raft_applied_index"), value(before, "surfshard_raft_applied_index")
            )
            self.assertGreater(
                value(after, "surfshard_raft_fsync_seconds_count"),
                value(before, "surfshard_raft_fsync_seconds_count"),
            )
            files = sum(after["surfshard_metadata_files"].values())
            self.assertEqual(files, 50)


class BlockStoreMetricsTests(SynchronousTestCase):
    def test_blocks_bytes_and_verification_failures(self) -> None:
        store = BlockStore(self.mktemp(), fsync=False)

        class Service:
            name = "blockstore-0"
            rpc_factory = None

        service = Service()
        service.store = store  # type: ignore[attr-defined]
        from prometheus_client import generate_latest

        registry = node_registry(service)
        h = store.put(b"hello")
        store.get(h)
        self.assertRaises(errors.BadRequest, store.put, b"x", "0" * 64)
        m = parse(generate_latest(registry).decode())
        self.assertEqual(value(m, "surfshard_blockstore_blocks_written_total"), 1)
        self.assertEqual(value(m, "surfshard_blockstore_bytes_written_total"), 5)
        self.assertEqual(value(m, "surfshard_blockstore_blocks_read_total"), 1)
        self.assertEqual(value(m, "surfshard_blockstore_verification_failures_total"), 1)
        self.assertEqual(value(m, "surfshard_blockstore_blocks"), 1)
        self.assertEqual(value(m, "surfshard_blockstore_pack_bytes"), 44 + 5)
        self.assertEqual(value(m, "surfshard_blockstore_dead_bytes"), 0)
        # A collection: the block dropped, its (only) pack rewritten.
        store.sweep([h], before=store.gc_clock()["now"])
        store.compact()
        m = parse(generate_latest(registry).decode())
        self.assertEqual(value(m, "surfshard_blockstore_blocks_collected_total"), 1)
        self.assertEqual(value(m, "surfshard_blockstore_blocks"), 0)
        self.assertEqual(value(m, "surfshard_blockstore_pack_bytes"), 0)
        self.assertEqual(value(m, "surfshard_blockstore_bytes_freed_total"), 44 + 5)  # head and data
