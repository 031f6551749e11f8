"""Collecting and showing every node's status (``surfshard status``, ``up``)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from rich import filesize
from rich.table import Table
from twisted.internet import defer

from surfshard import errors
from surfshard.config import ClusterConfig, NodeRef, member_addresses, node_name
from surfshard.net.interfaces import IRpcPool

if TYPE_CHECKING:
    from client.shardmaster_client import ShardMasterClient

STATUS_TIMEOUT = 2.0


Row = tuple[NodeRef, Any, str | None]


@defer.inlineCallbacks
def collect_status(cluster: ClusterConfig, pool: IRpcPool, nodes: list[NodeRef] | None = None):
    """``[(node, status dict or None, error str or None)]`` for every node,
    asked in parallel; a node that does not answer has its error instead."""
    nodes = list(cluster.all_nodes()) if nodes is None else nodes
    calls = [pool.call(n.address, "status", {}, timeout=STATUS_TIMEOUT) for n in nodes]
    results = yield defer.DeferredList(calls, consumeErrors=True)
    rows: list[Row] = []
    for node, (ok, value) in zip(nodes, results, strict=True):
        if ok:
            if node.index < 0 and isinstance(value, dict) and isinstance(value.get("id"), int):
                node = dataclasses.replace(node, index=value["id"] - 1)  # Raft ids are index + 1
            rows.append((node, value, None))
        else:
            error = value.value
            reason = error.code.value if isinstance(error, errors.SurfShardError) else type(error).__name__
            rows.append((node, None, reason))
    return rows


@defer.inlineCallbacks
def cluster_nodes(cluster: ClusterConfig, shardmaster: ShardMasterClient | None = None):
    """``(nodes, removed)``: every node the cluster has now (the config's,
    replicas added to a group since, as the ShardMaster's map lists them,
    their index -1, and replicas added to the ShardMaster, as its members
    say), and the addresses of the config's replicas taken out since.
    Without a ShardMaster client, or when it does not answer, the config's
    nodes."""
    if shardmaster is not None and cluster.shardmaster:
        try:
            shard_map = yield shardmaster.query(-1)
        except errors.SurfShardError:
            pass  # the config's nodes, then
        else:
            try:
                members = member_addresses((yield shardmaster.members()))
            except errors.SurfShardError:
                members = {}  # the config's ShardMaster replicas, then
            nodes = list(cluster.nodes_with_members(shard_map.groups, members))
            return nodes, cluster.removed_replicas(shard_map.groups, members)
    return list(cluster.all_nodes()), frozenset()


@defer.inlineCallbacks
def cluster_status(cluster: ClusterConfig, pool: IRpcPool, shardmaster: ShardMasterClient | None = None):
    """``(rows, removed)``: ``collect_status`` of ``cluster_nodes``."""
    nodes, removed = yield cluster_nodes(cluster, shardmaster)
    rows = yield collect_status(cluster, pool, nodes)
    return rows, removed


def status_json(rows: list[Row], removed: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """``removed``: addresses of replicas taken out of their group
    (``ClusterConfig.removed_replicas``), marked ``"removed": true``."""
    out = []
    for node, status, error in rows:
        entry: dict[str, Any] = {
            "name": node_name(node.kind, node.gid, node.index),
            "kind": node.kind.value,
            "gid": node.gid,
            "index": node.index,
            "address": node.address,
        }
        if node.address in removed:
            entry["removed"] = True
        if status is not None:
            entry["status"] = status
        else:
            entry["error"] = error
        out.append(entry)
    return out


def status_table(rows: list[Row], title: str = "", removed: frozenset[str] = frozenset()) -> Table:
    """``removed``: as for ``status_json``; such a replica shows as
    removed, not as an error, when it does not answer."""
    table = Table(title=title or None)
    columns = (
        "node",
        "address",
        "role",
        "term",
        "leader",
        "commit",
        "applied",
        "log",
        "map",
        "shards",
        "moving",
    )
    for column in columns:
        table.add_column(
            column, justify="right" if column in ("term", "commit", "applied", "log", "map") else "left"
        )
    for node, status, error in rows:
        name = node_name(node.kind, node.gid, node.index)
        gone = node.address in removed
        if status is None:
            role = "[dim]removed[/dim]" if gone else f"[red]{error}[/red]"
            table.add_row(name, node.address, role, *[""] * (len(columns) - 3))
            continue
        role = str(status.get("role", "?"))
        if gone:
            role = f"[yellow]removed, still running ({role})[/yellow]"
        elif status.get("crashed"):
            role = "[red]crashed[/red]"
        elif role == "leader":
            role = "[bold green]leader[/bold green]"
        shards = status.get("owned_shards")
        held = _ranges(shards) if isinstance(shards, list) else ""
        if (
            role == "blockstore"
            and isinstance(status.get("blocks"), int)
            and isinstance(status.get("pack_bytes"), int)
        ):
            held = f"{status['blocks']:,} blocks, {filesize.decimal(status['pack_bytes'])}"
        table.add_row(
            name,
            node.address,
            role,
            str(status.get("term", "")),
            str(status.get("leader_address") or "-"),
            str(status.get("commit", "")),
            str(status.get("applied", "")),
            str(status.get("log_size", "")),
            str(status.get("shard_map", "")),
            held,
            moving_summary(status.get("moving")),
        )
    return table


def moving_summary(moving: Any) -> str:
    """A node's shards in transit, e.g. "0 in from 1 (map 2), 5 out to 2 (map 2)"."""
    if not isinstance(moving, list) or not moving:
        return ""
    parts = []
    for m in moving:
        if not isinstance(m, dict):
            continue
        state = m.get("state")
        if state == "incoming":
            parts.append(f"{m.get('shard')} in from {m.get('from')} (map {m.get('num')})")
        elif state == "outgoing":
            parts.append(f"{m.get('shard')} out to {m.get('to')} (map {m.get('num')})")
        else:
            parts.append(f"{m.get('shard')} {state} {m.get('from')} (map {m.get('num')})")
    return ", ".join(parts)


def group_moves_table(rows: list[Row]) -> Table:
    """Per group, as its leader reports it: the shard map it is at and every
    shard it has in transit."""
    table = Table(title="groups")
    for column in ("group", "leader", "map", "serving", "moving"):
        table.add_column(column)
    seen: set[int] = set()
    for node, status, _error in rows:
        if status is None or status.get("role") != "leader" or node.gid in seen:
            continue
        seen.add(node.gid)
        shards = status.get("owned_shards")
        table.add_row(
            str(node.gid),
            node.address,
            str(status.get("shard_map", "")),
            _ranges(shards) if isinstance(shards, list) else "",
            moving_summary(status.get("moving")) or "-",
        )
    return table


def _ranges(shards: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    if not shards:
        return "-"
    parts = []
    start = prev = shards[0]
    for s in shards[1:] + [None]:
        if s is not None and s == prev + 1:
            prev = s
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if s is not None:
            start = prev = s
    return ",".join(parts)
