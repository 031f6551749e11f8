"""What ``surfshard status`` and the status page say of each node: a
replica taken out of its group by a membership change stays in the config
file, and is shown as removed, not as a node that is down."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from rich.console import Console
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from client.status import status_json, status_table
from surfshard.config import NodeKind, NodeRef, load_config
from surfshard.observe.statuspage import ClusterView

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

REMOVED = "127.0.0.1:7101"
GONE = NodeRef(NodeKind.GROUP, 1, 0, REMOVED)
DEAD = NodeRef(NodeKind.GROUP, 1, 1, "127.0.0.1:7102")
LEADER = NodeRef(NodeKind.GROUP, 1, 2, "127.0.0.1:7103")
STATUS = {"role": "leader", "term": 2, "commit": 9, "applied": 9, "last_index": 9, "progress": {}}


def text(table: object) -> str:
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(table)
    return out.getvalue()


def line(rendered: str, address: str) -> str:
    [row] = [row for row in rendered.splitlines() if address in row]
    return row


class StatusTableTests(SynchronousTestCase):
    rows = [(GONE, None, "UNAVAILABLE"), (DEAD, None, "UNAVAILABLE"), (LEADER, STATUS, None)]

    def test_a_removed_replica_is_not_shown_as_down(self) -> None:
        rendered = text(status_table(self.rows, removed=frozenset({REMOVED})))
        self.assertIn("removed", line(rendered, REMOVED))
        self.assertNotIn("UNAVAILABLE", line(rendered, REMOVED))
        # A replica still in the group that does not answer is still an error.
        self.assertIn("UNAVAILABLE", line(rendered, DEAD.address))
        # Without the map's word, nothing is taken for removed.
        self.assertIn("UNAVAILABLE", line(text(status_table(self.rows)), REMOVED))

    def test_a_removed_replica_that_still_runs_says_both(self) -> None:
        rows = [(GONE, dict(STATUS, role="follower"), None)]
        rendered = text(status_table(rows, removed=frozenset({REMOVED})))
        self.assertIn("removed, still running (follower)", line(rendered, REMOVED))

    def test_a_block_store_says_what_it_holds(self) -> None:
        store = NodeRef(NodeKind.BLOCKSTORE, 0, 0, "127.0.0.1:7301")
        held = {"role": "blockstore", "name": "blockstore-0", "blocks": 1234, "pack_bytes": 5_100_000}
        rendered = text(status_table([(store, held, None)]))
        self.assertIn("1,234 blocks, 5.1 MB", line(rendered, store.address))

    def test_json_marks_removed_replicas(self) -> None:
        entries = status_json(self.rows, frozenset({REMOVED}))
        self.assertEqual([e.get("removed", False) for e in entries], [True, False, False])
        self.assertEqual(entries[0]["error"], "UNAVAILABLE")


class StatusPageRoleTests(SynchronousTestCase):
    def node(self, ref: NodeRef, status: dict | None, removed: bool) -> dict:
        return {
            "name": f"group-{ref.gid}-{ref.index}",
            "kind": "group",
            "gid": ref.gid,
            "index": ref.index,
            "address": ref.address,
            "status": status,
            "error": None if status else "connection refused",
            "removed": removed,
        }

    def test_roles(self) -> None:
        nodes = [
            self.node(GONE, None, True),
            self.node(DEAD, None, False),
            self.node(LEADER, STATUS, False),
            self.node(NodeRef(NodeKind.GROUP, 1, 3, "127.0.0.1:7104"), dict(STATUS, role="follower"), True),
        ]
        [group] = ClusterView._groups(nodes)
        self.assertEqual(
            [m["role"] for m in group["members"]], ["removed", "down", "leader", "removed (follower)"]
        )
        self.assertEqual(group["leader"], "group-1-2")


class LauncherDisplayTests(SynchronousTestCase):
    """``surfshard up``'s display: the nodes it started, plus replicas added
    since (started by hand, as ``member add`` prints), and the removed ones
    marked as such."""

    def test_added_replicas_shown_and_removed_ones_marked(self) -> None:
        from twisted.internet.task import Clock

        from client import launcher

        cluster = load_config(CONFIGS / "local.toml")
        out = io.StringIO()
        up = launcher.Launcher(cluster, str(CONFIGS / "local.toml"), Clock(), Console(file=out, width=200))
        configured = cluster.all_nodes()
        added = NodeRef(NodeKind.GROUP, 1, -1, "127.0.0.1:7104")
        removed = frozenset({"127.0.0.1:7101"})
        up.children = {f"n{i}": type("Child", (), {"node": ref})() for i, ref in enumerate(configured)}
        asked: list[list[NodeRef]] = []

        def cluster_nodes(cluster: Any, shardmaster: Any) -> Any:
            return defer.succeed(([*configured, added], removed))

        def collect_status(cluster: Any, pool: Any, nodes: list[NodeRef]) -> Any:
            asked.append(nodes)
            rows = [
                (n, None if n.address == "127.0.0.1:7101" else {"role": "follower", "id": 4}, "UNAVAILABLE")
                for n in nodes
            ]
            return defer.succeed(rows)

        self.patch(launcher, "cluster_nodes", cluster_nodes)
        self.patch(launcher, "collect_status", collect_status)
        self.successResultOf(up.show_status())
        self.assertEqual(asked, [[*configured, added]])
        text = out.getvalue()
        self.assertIn("127.0.0.1:7104", text)
        line = next(line for line in text.splitlines() if "127.0.0.1:7101" in line)
        self.assertIn("removed", line)
        self.assertNotIn("UNAVAILABLE", line)
