"""``twistd surfshard``: one replica of a metadata group."""

from __future__ import annotations

from twisted.python import usage

from surfshard.config import ClusterConfig
from surfshard.replica.options import NodeOptions


class Options(NodeOptions):
    synopsis = "--config FILE --group GID --node I [--address HOST:PORT] [--chaos]"
    longdesc = (
        "Run replica I of metadata group GID of the cluster described by FILE "
        "(a TOML cluster config or a SurfStore 'M: N' config). A replica added "
        "to a running group (`surfshard admin member add`) is past the config's "
        "list: give its --node and --address as that command prints them."
    )
    optParameters = [
        *NodeOptions.optParameters,
        ["group", "g", None, "group id (1 for a SurfStore-format config)", int],
        ["address", None, None, "this node's host:port, for a node added to a running group"],
    ]
    #: Nodes past the config's list are allowed when --address names them.
    allows_added_nodes = True
    optFlags = [
        *NodeOptions.optFlags,
        ["chaos", None, "answer ChaosMonkey calls (crash/restore/set_leader) even if the config does not"],
    ]

    def nodes(self, cluster: ClusterConfig) -> tuple[str, ...]:
        if self["group"] is None:
            raise usage.UsageError("--group and --node are required")
        if self["group"] not in cluster.groups:
            raise usage.UsageError(
                f"{cluster.source}: no group {self['group']} (groups: {sorted(cluster.groups)})"
            )
        return cluster.groups[self["group"]]


def makeService(options: Options):
    from twisted.internet import reactor

    from surfshard.clock import use_monotonic_clock
    from surfshard.metadata.service import MetadataService

    use_monotonic_clock(reactor)
    return MetadataService(
        options["cluster"],
        options["group"],
        options["node"],
        reactor,
        chaos=True if options["chaos"] else None,
        fsync=options.fsync,
        address=options["address"],
    )
