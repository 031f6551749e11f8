"""The ShardMaster as real processes, driven by ``surfshard admin``.

Three ``twistd -n shardmaster`` processes on free loopback ports (a TOML
config in a temp dir), and the operator command run as a subprocess
(``python -m client.cli admin ... --json``), the way an operator or a script
uses it: join, query, move, leave and show print the map; refused requests
exit non-zero with the reason on stderr; SIGKILLing the leader leaves the
other two serving, and the killed node restarts from its data directory and
catches up.

Blocking helpers from ``tests.procs``; every process started here is killed
by pid in cleanup.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from surfshard.errors import Unavailable
from tests.procs import (
    REPO_ROOT,
    NativeClient,
    NodeExited,
    NodeProcess,
    addresses_of,
    free_ports,
    is_connection_error,
    twistd_command,
    wait_until,
)

NSHARDS = 6
#: Generous: each admin run imports Twisted and friends on a loaded machine.
ADMIN_TIMEOUT = 90.0
START_TIMEOUT = 60.0


def write_config(directory: Path, shardmaster_ports: list[int], group_ports: list[int]) -> Path:
    """A cluster with a 3-node ShardMaster and one (never started) group."""
    directory.mkdir(parents=True, exist_ok=True)

    def nodes(ports: list[int]) -> str:
        return ", ".join(f'"{a}"' for a in addresses_of(ports))

    text = "\n".join(
        [
            "[cluster]",
            'name = "smproc"',
            f"shards = {NSHARDS}",
            'data_dir = "data"',
            "chaos = false",
            "",
            "[shardmaster]",
            f"nodes = [{nodes(shardmaster_ports)}]",
            "",
            "[groups.1]",
            f"nodes = [{nodes(group_ports)}]",
            "",
            "[raft]",
            "tick_ms = 50",
            "heartbeat_ticks = 2",
            "election_ticks = 6",
            "fsync = true",
            "",
        ]
    )
    path = directory / "cluster.toml"
    path.write_text(text, encoding="utf-8")
    return path


class ShardMasterProcessTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = Path(self.mktemp()).resolve()
        ports = free_ports(7)
        self.addresses = addresses_of(ports[:3])
        self.group_addresses = addresses_of(ports[3:6])
        #: A free port for a replica added while the ShardMaster runs.
        self.spare = addresses_of(ports[6:])[0]
        self.config = write_config(self.directory, ports[:3], ports[3:6])
        self.nodes = [self.node_process(i, address) for i, address in enumerate(self.addresses)]
        self.addCleanup(self.kill_all)

    def node_process(self, i: int, address: str, *extra: str) -> NodeProcess:
        return NodeProcess(
            f"shardmaster-{i}",
            [
                *twistd_command(),
                "--nodaemon",
                "--pidfile=",
                "--logfile=-",
                "shardmaster",
                "--config",
                str(self.config),
                "--node",
                str(i),
                *extra,
            ],
            self.directory / "logs" / f"shardmaster-{i}.log",
            address,
        )

    def kill_all(self) -> None:
        # Only our own processes, by pid (NodeProcess signals its Popen only).
        for node in self.nodes:
            node.kill()

    # -- helpers ----------------------------------------------------------

    def logs(self) -> str:
        return "\n".join(f"----- {n.describe()} -----\n{n.log_tail()}" for n in self.nodes)

    def native(self, i: int, method: str, args: dict[str, Any] | None = None) -> Any:
        """One native call to node ``i``; None if it does not answer."""
        try:
            with NativeClient(self.addresses[i], timeout=3.0) as client:
                return client.call(method, args)
        except Unavailable:
            return None
        except OSError as e:
            if is_connection_error(e):
                return None
            raise

    def wait_serving(self, i: int) -> None:
        node = self.nodes[i]

        def serving() -> bool:
            if not node.running:
                raise NodeExited(f"{node.describe()} exited while starting\n{self.logs()}")
            return self.native(i, "ping") is True

        wait_until(serving, START_TIMEOUT, 0.1, lambda: f"{node.describe()} never answered\n{self.logs()}")

    def leader(self, among: list[int]) -> int:
        """The one node of ``among`` that says it leads."""

        def one() -> int | None:
            found = [i for i in among if self.native(i, "is_leader")]
            return found[0] + 1 if len(found) == 1 else None  # +1: node 0 is falsy

        return wait_until(one, 20.0, 0.1, lambda: f"no single leader among {among}\n{self.logs()}") - 1

    def admin(self, *args: str, json_output: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "client.cli", "admin", "--config", str(self.config), "--timeout", "20"]
        if json_output:
            argv.append("--json")
        argv += list(args)
        return subprocess.run(
            argv,
            cwd=str(REPO_ROOT),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=ADMIN_TIMEOUT,
            check=False,
        )

    def admin_map(self, *args: str) -> dict[str, Any]:
        """Run an admin command that must succeed; its JSON map."""
        done = self.admin(*args)
        self.assertEqual(
            done.returncode,
            0,
            f"surfshard admin {' '.join(args)} failed:\nstdout: {done.stdout}\nstderr: {done.stderr}\n{self.logs()}",
        )
        result = json.loads(done.stdout)
        self.assertEqual(set(result), {"num", "shards", "groups"}, done.stdout)
        return result

    def admin_fails(self, expected: str, *args: str, code: int = 1) -> str:
        """Run an admin command that must fail: exit ``code``, ``expected`` on
        stderr, nothing on stdout; returns stderr."""
        done = self.admin(*args)
        where = f"surfshard admin {' '.join(args)}: stdout {done.stdout!r} stderr {done.stderr!r}"
        self.assertEqual(done.returncode, code, where)
        self.assertIn(expected, " ".join(done.stderr.split()), where)
        self.assertEqual(done.stdout, "", where)
        return done.stderr

    # -- the test -----------------------------------------------------------

    def test_admin_command_against_three_real_replicas(self) -> None:
        for i in range(3):
            self.nodes[i].start()
        for i in range(3):
            self.wait_serving(i)
        self.leader([0, 1, 2])

        m = self.admin_map("show")
        self.assertEqual(m, {"num": 0, "shards": [0] * NSHARDS, "groups": {}})

        # A group of the config joins with the config's replicas by default.
        m = self.admin_map("join", "1")
        self.assertEqual(m, {"num": 1, "shards": [1] * NSHARDS, "groups": {"1": self.group_addresses}})

        m = self.admin_map("join", "2", "127.0.0.1:1", "127.0.0.1:2")
        self.assertEqual(m["num"], 2)
        self.assertEqual(sorted(m["shards"]), [1, 1, 1, 2, 2, 2])
        self.assertEqual(m["groups"], {"1": self.group_addresses, "2": ["127.0.0.1:1", "127.0.0.1:2"]})
        map2 = m

        self.assertEqual(self.admin_map("query", "1")["num"], 1)
        self.assertEqual(self.admin_map("query", "1")["shards"], [1] * NSHARDS)

        m = self.admin_map("move", "0", "2")
        self.assertEqual(m["num"], 3)
        self.assertEqual(m["shards"], [2, *map2["shards"][1:]])
        map3 = m

        # Refusals: a non-zero exit, the reason on stderr, no new map.
        self.admin_fails("already exists", "join", "1", "127.0.0.1:9")
        self.admin_fails("group 99 is unknown", "leave", "99")
        self.admin_fails("out of range", "move", str(NSHARDS), "1")
        self.admin_fails("out of range", "move", "-1", "1")
        self.admin_fails("malformed address", "join", "5", "not-an-address")
        self.admin_fails("reserved", "join", "0", "127.0.0.1:9")
        # Bracketed text in a message is printed as is, not eaten as markup.
        self.admin_fails("'[fe80::1]:99999' has port 99999 outside", "join", "5", "[fe80::1]:99999")
        self.admin_fails("invalid literal", "join", "five", "127.0.0.1:9", code=2)
        self.admin_fails("group 5 is not in the config: name its replicas", "join", "5", code=2)
        self.admin_fails("join needs GID", "join", code=2)
        self.assertEqual(self.admin_map("show"), map3)

        # A config without a ShardMaster has nothing to administer.
        static = self.directory / "static.toml"
        static.write_text('[cluster]\nname = "s"\nshards = 2\n\n[groups.1]\nnodes = ["127.0.0.1:1"]\n')
        self.admin_fails(
            "has no [shardmaster]: it is a static cluster", "--config", str(static), "show", code=2
        )

        # The human form: a table naming the map, the groups and their nodes.
        done = self.admin("show", json_output=False)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("shard map 3", done.stdout)
        for address in self.group_addresses:
            self.assertIn(address, done.stdout)

        # SIGKILL the leader: the other two elect a leader and keep serving.
        old = self.leader([0, 1, 2])
        self.nodes[old].kill()
        rest = [i for i in range(3) if i != old]
        self.leader(rest)
        m = self.admin_map("leave", "1")
        self.assertEqual(
            (m["num"], m["shards"], m["groups"]), (4, [2] * NSHARDS, {"2": ["127.0.0.1:1", "127.0.0.1:2"]})
        )
        self.assertEqual(self.admin_map("show"), m)
        self.assertEqual(self.admin_map("query", "3"), map3)

        # The killed node restarts from its data directory and catches up.
        self.nodes[old].start()
        self.wait_serving(old)

        def caught_up() -> bool:
            status = self.native(old, "status")
            return status is not None and status.get("latest") == 4

        wait_until(caught_up, 30.0, 0.2, lambda: f"restarted node {old} did not catch up\n{self.logs()}")

    def members(self) -> dict[str, Any]:
        done = self.admin("member", "list", "shardmaster")
        self.assertEqual(done.returncode, 0, f"member list failed: {done.stderr}\n{self.logs()}")
        return json.loads(done.stdout)["members"]

    def test_a_dead_replica_replaced_and_the_new_one_leading(self) -> None:
        """The README's replacement of a dead replica, done to the
        ShardMaster itself: add a fourth, start it with the command ``member
        add`` prints, remove the dead one. Then the added replica leads,
        and callers that know only the config's replicas (the admin
        command, here) still find it."""
        for i in range(3):
            self.nodes[i].start()
        for i in range(3):
            self.wait_serving(i)
        self.admin_map("join", "1")

        done = self.admin("member", "add", "shardmaster", self.spare, json_output=False)
        self.assertEqual(done.returncode, 0, done.stderr)
        printed = " ".join(done.stdout.split())
        self.assertIn(
            f"twistd -n shardmaster --config {self.config} --node 3 --address {self.spare}", printed
        )
        self.nodes.append(self.node_process(3, self.spare, "--address", self.spare))
        self.addresses.append(self.spare)
        self.nodes[3].start()
        self.wait_serving(3)

        def voter(raft_id: int) -> bool:
            return raft_id in {m["id"] for m in self.members()["voters"]}

        wait_until(lambda: voter(4), 30.0, 0.2, lambda: f"node 4 never became a voter\n{self.logs()}")

        # The first replica dies for good and is removed.
        self.nodes[0].kill()
        done = self.admin("member", "remove", "shardmaster", "1")
        self.assertEqual(done.returncode, 0, f"{done.stderr}\n{self.logs()}")
        members = self.members()
        self.assertEqual(
            sorted((m["id"], m["address"]) for m in members["voters"]),
            [(2, self.addresses[1]), (3, self.addresses[2]), (4, self.spare)],
        )

        # The operator hands leadership to the added replica.
        done = self.admin("member", "lead", "shardmaster", "4")
        self.assertEqual(done.returncode, 0, f"{done.stderr}\n{self.logs()}")
        self.assertEqual(json.loads(done.stdout)["result"], {"leader": 4, "address": self.spare})
        self.assertIs(self.native(3, "is_leader"), True)
        # Not to a node that is not a voter: refused, with the reason.
        done = self.admin("member", "lead", "shardmaster", "1")
        self.assertEqual(done.returncode, 1, done.stdout)
        self.assertIn("1 is not a voter", done.stderr)

        # The config names only 0 (dead), 1 and 2 (followers): their
        # NOT_LEADER answers lead the command to the new leader.
        m = self.admin_map("join", "2", "127.0.0.1:1")
        self.assertEqual(m["num"], 2)
        self.assertEqual(sorted(m["groups"]), ["1", "2"])

        # The added replica restarts from its own data directory, still a member.
        self.nodes[3].kill()
        self.leader([1, 2])
        self.assertEqual(self.admin_map("move", "0", "1")["num"], 3)
        self.nodes[3].start()
        self.wait_serving(3)

        def caught_up() -> bool:
            status = self.native(3, "status")
            return status is not None and status.get("latest") == 3

        wait_until(caught_up, 30.0, 0.2, lambda: f"restarted node 4 did not catch up\n{self.logs()}")
        self.assertTrue(voter(4))
