"""Prometheus metrics of a node, at ``/metrics`` on its port (the HTTP side
of the shared port, so over TLS when TLS is on).

Almost nothing is counted for metrics' sake on the hot path: the collector
reads what the node's parts keep anyway (Raft's indexes and counters, the
RPC server's per-method counts, the state machine's sizes, the fixed-bucket
histograms of ``raft.stats``) when Prometheus scrapes, and turns them into
metric families with ``prometheus_client``. Names follow Prometheus's
conventions: the ``surfshard_`` prefix, base units (seconds, bytes),
``_total`` for counters.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from twisted.web.resource import Resource
from twisted.web.server import Request

from raft.stats import Histogram
from raft.types import Role

__all__ = ["MetricsResource", "NodeCollector", "node_registry"]

ROLES = tuple(r.value for r in Role)


def _histogram(name: str, doc: str, h: Histogram, labels: dict[str, str]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), h.cumulative(), h.sum)
    return family


class NodeCollector(Collector):
    """Reads a running service (``ReplicaService``, ``MetadataService``,
    ``BlockStoreService``) at scrape time."""

    def __init__(self, service: Any) -> None:
        self.service = service

    def collect(self) -> Iterator[Any]:
        s = self.service
        node_label = {"node": s.name}
        names, values = list(node_label), list(node_label.values())

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=names)
            g.add_metric(values, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=names)
            c.add_metric(values, value)
            return c

        node: Any = getattr(s, "node", None)
        core = None
        if node is not None and node.running:
            try:
                core = node.core
            except RuntimeError:  # not started yet
                core = None
        if core is not None:
            yield gauge("surfshard_raft_term", "Current Raft term.", core.term)
            role = GaugeMetricFamily(
                "surfshard_raft_role", "1 for the node's Raft role.", labels=[*names, "role"]
            )
            current = core.role.value
            for r in ROLES:
                role.add_metric([*values, r], 1.0 if r == current else 0.0)
            yield role
            yield gauge(
                "surfshard_raft_commit_index", "Highest log index known committed.", core.commit_index
            )
            yield gauge("surfshard_raft_applied_index", "Highest log index applied.", node.applied_index)
            yield gauge("surfshard_raft_last_index", "Last log index.", core.last_index)
            yield gauge("surfshard_raft_voters", "Voters in the group's membership.", len(core.voters))
            yield gauge(
                "surfshard_raft_learners",
                "Learners in the group's membership.",
                len(core.membership.learners),
            )
            yield gauge(
                "surfshard_raft_membership_pending",
                "1 while a membership change is appended and not yet committed.",
                1.0 if core.membership_pending else 0.0,
            )
            yield gauge(
                "surfshard_raft_snapshot_index", "Index of the latest snapshot.", core.snapshot_meta.index
            )
            yield gauge(
                "surfshard_raft_leader_gap_max_seconds",
                "Longest silence seen between two messages of one leader.",
                node.max_leader_gap,
            )
            yield counter(
                "surfshard_raft_elections_total", "Elections this node started.", node.stats_elections
            )
            yield counter(
                "surfshard_raft_leader_changes_total",
                "Leaders this node saw take over.",
                node.stats_leader_changes,
            )
            yield counter(
                "surfshard_raft_proposals_total", "Commands proposed on this node.", node.stats_proposals
            )
            yield _histogram(
                "surfshard_raft_append_seconds",
                "Time to write a batch of Raft state and entries to storage (append and sync).",
                node.stats_persist_seconds,
                node_label,
            )
            fsync = getattr(node.storage, "fsync_seconds", None)
            if isinstance(fsync, Histogram):
                yield _histogram(
                    "surfshard_raft_fsync_seconds", "Time of one fsync of the WAL.", fsync, node_label
                )
            yield _histogram(
                "surfshard_raft_snapshot_seconds",
                "Time to take a periodic snapshot.",
                node.stats_snapshot_seconds,
                node_label,
            )
            yield _histogram(
                "surfshard_raft_snapshot_bytes",
                "Size of each periodic snapshot.",
                node.stats_snapshot_bytes,
                node_label,
            )

        rpc = getattr(s, "rpc_factory", None)
        if rpc is not None:
            requests = CounterMetricFamily(
                "surfshard_rpc_requests_total",
                "Native requests received, by method.",
                labels=[*names, "method"],
            )
            for method, n in sorted(rpc.requests.items()):
                requests.add_metric([*values, method], n)
            yield requests
            errors = CounterMetricFamily(
                "surfshard_rpc_errors_total",
                "Native requests answered with an error, by method and error code.",
                labels=[*names, "method", "code"],
            )
            for (method, code), n in sorted(rpc.errors.items()):
                errors.add_metric([*values, method, code], n)
            yield errors
            yield gauge("surfshard_rpc_connections", "Native connections open.", len(rpc.connections))
            yield gauge(
                "surfshard_rpc_buffered_bytes",
                "Bytes held in the node's buffers at the last count (the memory budget's figure).",
                rpc.buffered_bytes,
            )

        machine = getattr(s, "machine", None)
        if machine is not None and hasattr(machine, "shard_sizes"):
            files = GaugeMetricFamily(
                "surfshard_metadata_files", "Files in each shard served.", labels=[*names, "shard"]
            )
            sessions = GaugeMetricFamily(
                "surfshard_metadata_dedup_sessions",
                "Dedup sessions of each shard served.",
                labels=[*names, "shard"],
            )
            revision = GaugeMetricFamily(
                "surfshard_metadata_shard_revision",
                "Writes each shard served has taken.",
                labels=[*names, "shard"],
            )
            for shard, (n_files, n_sessions, rev) in sorted(machine.shard_sizes().items()):
                files.add_metric([*values, str(shard)], n_files)
                sessions.add_metric([*values, str(shard)], n_sessions)
                revision.add_metric([*values, str(shard)], rev)
            yield files
            yield sessions
            yield revision
            moving = machine.transfers()
            yield gauge(
                "surfshard_shard_moves_in_progress", "Shards this group is giving or taking.", len(moving)
            )
            yield gauge(
                "surfshard_metadata_shard_map",
                "Shard map number this group serves under.",
                machine.config_num,
            )
            replica = s.replica
            yield counter(
                "surfshard_metadata_batches_total",
                "Update batches proposed as one entry.",
                replica.batches_proposed,
            )
            yield counter(
                "surfshard_metadata_batched_updates_total",
                "Updates proposed inside batches.",
                replica.batched_updates,
            )
            migrator = getattr(s, "migrator", None)
            if migrator is not None:
                yield counter(
                    "surfshard_shard_move_bytes_total",
                    "Bytes of shard data pulled from other groups.",
                    migrator.bytes_pulled,
                )
                yield counter(
                    "surfshard_shard_moves_total",
                    "Shards installed from other groups.",
                    migrator.shards_installed,
                )

        store = getattr(s, "store", None)
        if store is not None and hasattr(store, "stats"):
            st = store.stats
            yield counter("surfshard_blockstore_blocks_written_total", "Blocks written.", st["written"])
            yield counter(
                "surfshard_blockstore_bytes_written_total", "Bytes of blocks written.", st["bytes_written"]
            )
            yield counter("surfshard_blockstore_blocks_read_total", "Blocks read.", st["read"])
            yield counter(
                "surfshard_blockstore_verification_failures_total",
                "Blocks refused or found corrupt: a hash that did not match.",
                st["verification_failures"],
            )
            usage = store.usage()
            yield gauge("surfshard_blockstore_blocks", "Blocks held in pack files.", usage["blocks"])
            yield gauge("surfshard_blockstore_pack_bytes", "Size of the pack files.", usage["pack_bytes"])
            yield gauge(
                "surfshard_blockstore_dead_bytes",
                "Bytes of dropped blocks in packs not rewritten yet (under a quarter of their pack).",
                usage["dead_bytes"],
            )
            yield counter(
                "surfshard_blockstore_blocks_collected_total",
                "Blocks dropped by a collection (surfshard blocks gc): no file named them.",
                st["collected"],
            )
            yield counter(
                "surfshard_blockstore_bytes_freed_total",
                "Bytes of pack files freed by rewriting packs after a collection.",
                st["bytes_freed"],
            )


def node_registry(service: Any) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(service))
    return registry


class MetricsResource(Resource):
    """``/metrics``: the Prometheus text format."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return generate_latest(self.registry)
