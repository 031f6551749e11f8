"""``twistd surfblock``: one block store."""

from __future__ import annotations

from surfshard.config import ClusterConfig, NodeKind
from surfshard.replica.options import NodeOptions


class Options(NodeOptions):
    synopsis = "--config FILE --node I"
    longdesc = "Run block store I ([blockstores] nodes) of the cluster described by FILE."

    kind = NodeKind.BLOCKSTORE

    def nodes(self, cluster: ClusterConfig) -> tuple[str, ...]:
        return cluster.blockstores


def makeService(options: Options):
    from twisted.internet import reactor

    from surfshard.blocks.store import BlockStoreService
    from surfshard.clock import use_monotonic_clock

    use_monotonic_clock(reactor)
    return BlockStoreService(options["cluster"], options["node"], reactor, fsync=options.fsync)
