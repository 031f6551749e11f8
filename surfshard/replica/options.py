"""What the twistd plugins' command lines share: ``--config`` and ``--node``,
the config loaded and the node index checked before anything starts."""

from __future__ import annotations

from typing import Any

from twisted.python import usage

from surfshard.config import (
    ClusterConfig,
    ConfigError,
    NodeKind,
    default_config_path,
    load_config,
    node_name,
    parse_address,
)
from surfshard.observe.logs import FORMATS, install


class NodeOptions(usage.Options):
    """Base of the plugins' options. Subclasses list their own parameters
    and implement ``nodes(cluster)``: the addresses ``--node`` indexes."""

    optParameters: list[list[Any]] = [
        ["config", "c", None, "cluster config file (default: the built-in local cluster)"],
        ["node", "n", None, "node index, from 0", int],
        ["log-format", None, "text", "log lines as text (naming the node) or json (one object per line)"],
    ]
    #: The kind of node these options start (for its name in logs).
    kind = NodeKind.GROUP
    optFlags: list[list[Any]] = [
        ["no-fsync", None, "do not fsync (faster, not crash-safe; for benchmarks)"],
    ]

    def nodes(self, cluster: ClusterConfig) -> tuple[str, ...]:
        raise NotImplementedError

    def postOptions(self) -> None:
        if self["node"] is None:
            raise usage.UsageError("--node is required")
        try:
            cluster = self["cluster"] = load_config(self["config"] or default_config_path())
        except (ConfigError, OSError) as e:
            raise usage.UsageError(str(e)) from e
        nodes = self.nodes(cluster)
        added = getattr(self, "allows_added_nodes", False) and self.get("address") is not None
        if added:
            if self["node"] < 0:
                raise usage.UsageError("--node counts from 0")
            try:
                parse_address(self["address"])
            except ValueError as e:
                raise usage.UsageError(f"--address: {e}") from e
            if self["node"] < len(nodes) and nodes[self["node"]] != self["address"]:
                raise usage.UsageError(
                    f"{cluster.source}: node {self['node']} is at {nodes[self['node']]}, not {self['address']}"
                )
        elif not 0 <= self["node"] < len(nodes):
            raise usage.UsageError(
                f"{cluster.source}: node {self['node']} does not exist (valid: nodes 0..{len(nodes) - 1})"
                if nodes
                else f"{cluster.source}: the config lists no such nodes"
            )
        if self["log-format"] not in FORMATS:
            raise usage.UsageError(f"--log-format must be one of {', '.join(FORMATS)}")
        name = node_name(self.kind, self.get("group") or 0, self["node"])
        install(getattr(self, "parent", None), name, self["log-format"])

    @property
    def fsync(self) -> bool | None:
        """False when --no-fsync was given, else None (the config decides)."""
        return False if self["no-fsync"] else None
