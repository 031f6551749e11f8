"""``twistd shardmaster``: one replica of the ShardMaster."""

from __future__ import annotations

from twisted.python import usage

from surfshard.config import ConfigError, default_config_path, load_config


class Options(usage.Options):
    synopsis = "--config FILE --node I [--chaos]"
    longdesc = "Run replica I of the ShardMaster of the cluster described by FILE (a TOML cluster config)."
    optParameters = [
        ["config", "c", None, "cluster config file (default: the built-in local cluster)"],
        ["node", "n", None, "node index within [shardmaster] nodes, from 0", int],
    ]
    optFlags = [
        ["chaos", None, "answer ChaosMonkey calls (crash/restore/set_leader) even if the config does not"],
        ["no-fsync", None, "do not fsync the Raft log (faster, not crash-safe; for benchmarks)"],
    ]

    def postOptions(self) -> None:
        if self["node"] is None:
            raise usage.UsageError("--node is required")
        try:
            self["cluster"] = load_config(self["config"] or default_config_path())
        except (ConfigError, OSError) as e:
            raise usage.UsageError(str(e)) from e
        cluster = self["cluster"]
        if not cluster.shardmaster:
            raise usage.UsageError(f"{cluster.source}: no [shardmaster] nodes in this config")
        if not 0 <= self["node"] < len(cluster.shardmaster):
            raise usage.UsageError(
                f"{cluster.source}: shardmaster nodes are 0..{len(cluster.shardmaster) - 1}"
            )


def makeService(options: Options):
    from twisted.internet import reactor

    from shardmaster.server import ShardMasterService
    from surfshard.clock import use_monotonic_clock

    use_monotonic_clock(reactor)
    return ShardMasterService(
        options["cluster"],
        options["node"],
        reactor,
        chaos=True if options["chaos"] else None,
        fsync=False if options["no-fsync"] else None,
    )
