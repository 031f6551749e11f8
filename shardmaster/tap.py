"""``twistd shardmaster``: one replica of the ShardMaster."""

from __future__ import annotations

from surfshard.config import ClusterConfig, NodeKind
from surfshard.replica.options import NodeOptions


class Options(NodeOptions):
    synopsis = "--config FILE --node I [--address HOST:PORT] [--chaos]"
    longdesc = (
        "Run replica I of the ShardMaster of the cluster described by FILE (a TOML cluster "
        "config). A replica added to the running ShardMaster (`surfshard admin member add "
        "shardmaster`) is past the config's list: give its --node and --address as that "
        "command prints them."
    )
    optParameters = [
        *NodeOptions.optParameters,
        ["address", None, None, "this node's host:port, for a node added to the running ShardMaster"],
    ]
    #: Nodes past the config's list are allowed when --address names them.
    allows_added_nodes = True
    optFlags = [
        *NodeOptions.optFlags,
        ["chaos", None, "answer ChaosMonkey calls (crash/restore/set_leader) even if the config does not"],
    ]

    kind = NodeKind.SHARDMASTER

    def nodes(self, cluster: ClusterConfig) -> tuple[str, ...]:
        return cluster.shardmaster


def makeService(options: Options):
    from twisted.internet import reactor

    from shardmaster.service import ShardMasterService
    from surfshard.clock import use_monotonic_clock

    use_monotonic_clock(reactor)
    return ShardMasterService(
        options["cluster"],
        options["node"],
        reactor,
        chaos=True if options["chaos"] else None,
        fsync=options.fsync,
        address=options["address"],
    )
