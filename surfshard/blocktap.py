"""``twistd surfblock``: one block store."""

from __future__ import annotations

from twisted.python import usage

from surfshard.config import ConfigError, default_config_path, load_config


class Options(usage.Options):
    synopsis = "--config FILE --node I"
    longdesc = "Run block store I ([blockstores] nodes) of the cluster described by FILE."
    optParameters = [
        ["config", "c", None, "cluster config file (default: the built-in local cluster)"],
        ["node", "n", None, "block store index, from 0", int],
    ]
    optFlags = [["no-fsync", None, "do not fsync blocks (faster, not crash-safe; for benchmarks)"]]

    def postOptions(self) -> None:
        if self["node"] is None:
            raise usage.UsageError("--node is required")
        try:
            self["cluster"] = load_config(self["config"] or default_config_path())
        except (ConfigError, OSError) as e:
            raise usage.UsageError(str(e)) from e
        stores = self["cluster"].blockstores
        if not 0 <= self["node"] < len(stores):
            raise usage.UsageError(f"{self['cluster'].source}: block stores are 0..{len(stores) - 1}")


def makeService(options: Options):
    from twisted.internet import reactor

    from surfshard.blockstore import BlockStoreService

    return BlockStoreService(
        options["cluster"], options["node"], reactor, fsync=False if options["no-fsync"] else None
    )
