"""``twistd surfshard``: one replica of a metadata group."""

from __future__ import annotations

import sys

from twisted.python import usage

from surfshard.config import ConfigError, default_config_path, load_config


class Options(usage.Options):
    synopsis = "--config FILE --group GID --node I [--chaos]"
    longdesc = (
        "Run replica I of metadata group GID of the cluster described by FILE "
        "(a TOML cluster config or a SurfStore 'M: N' config)."
    )
    optParameters = [
        ["config", "c", None, "cluster config file (default: the built-in local cluster)"],
        ["group", "g", None, "group id (1 for a SurfStore-format config)", int],
        ["node", "n", None, "node index within the group, from 0", int],
    ]
    optFlags = [
        ["chaos", None, "answer ChaosMonkey calls (crash/restore/set_leader) even if the config does not"],
        ["no-fsync", None, "do not fsync the Raft log (faster, not crash-safe; for benchmarks)"],
    ]

    def postOptions(self) -> None:
        if self["group"] is None or self["node"] is None:
            raise usage.UsageError("--group and --node are required")
        try:
            self["cluster"] = load_config(self["config"] or default_config_path())
        except (ConfigError, OSError) as e:
            raise usage.UsageError(str(e)) from e
        cluster = self["cluster"]
        if self["group"] not in cluster.groups:
            raise usage.UsageError(
                f"{cluster.source}: no group {self['group']} (groups: {sorted(cluster.groups)})"
            )
        if not 0 <= self["node"] < len(cluster.groups[self["group"]]):
            raise usage.UsageError(
                f"{cluster.source}: group {self['group']} has nodes 0..{len(cluster.groups[self['group']]) - 1}"
            )


def makeService(options: Options):
    from twisted.internet import reactor

    from surfshard.clock import use_monotonic_clock
    from surfshard.server import MetadataService

    use_monotonic_clock(reactor)
    return MetadataService(
        options["cluster"],
        options["group"],
        options["node"],
        reactor,
        chaos=True if options["chaos"] else None,
        fsync=False if options["no-fsync"] else None,
    )


if __name__ == "__main__":  # pragma: no cover - handy for debugging
    sys.exit("run with: twistd -n surfshard --config FILE --group GID --node I")
