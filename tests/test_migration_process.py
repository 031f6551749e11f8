"""Shard migration between real processes: a 3-node ShardMaster and three
3-node metadata groups as ``twistd`` processes on 127.0.0.1, shards moved
repeatedly (``surfshard admin move``) while concurrent writers run
(``tests/migration_load.py``, a subprocess with its own reactor), and the
leaders of both the source and the destination group SIGKILLed in the middle
of a transfer, then restarted from their data directories. The recorded
history must be linearizable, which also means no acknowledged write was lost
or applied twice.

Blocking helpers from ``tests.procs``; every process started here is killed
by pid in cleanup.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from surfshard import errors
from surfshard.errors import SurfShardError
from surfshard.keyspace import shard_of
from tests.migration_load import check_history
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
GIDS = (1, 2, 3)
START_TIMEOUT = 60.0
ADMIN_TIMEOUT = 90.0
#: Big files make each shard a few chunks, so a transfer takes long enough
#: to be caught in the middle.
BIG_FILES = 12
BIG_HASHES = 40_000


def write_config(directory: Path, sm: list[str], groups: dict[int, list[str]]) -> Path:
    def nodes(addresses: list[str]) -> str:
        return ", ".join(f'"{a}"' for a in addresses)

    lines = ["[cluster]", 'name = "migproc"', f"shards = {NSHARDS}", 'data_dir = "data"', "chaos = false", ""]
    lines += ["[shardmaster]", f"nodes = [{nodes(sm)}]", ""]
    for gid, addresses in groups.items():
        lines += [f"[groups.{gid}]", f"nodes = [{nodes(addresses)}]", ""]
    lines += ["[raft]", "tick_ms = 50", "heartbeat_ticks = 2", "election_ticks = 6", "fsync = true", ""]
    path = directory / "cluster.toml"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


class MigrationProcessTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = Path(self.mktemp()).resolve()
        self.directory.mkdir(parents=True)
        ports = free_ports(3 + 3 * len(GIDS))
        self.sm = addresses_of(ports[:3])
        self.groups = {gid: addresses_of(ports[3 * k : 3 * k + 3]) for k, gid in enumerate(GIDS, start=1)}
        self.config = write_config(self.directory, self.sm, self.groups)
        self.nodes: dict[str, NodeProcess] = {}
        for i, address in enumerate(self.sm):
            self._node(f"shardmaster-{i}", ["shardmaster", "--node", str(i)], address)
        for gid, addresses in self.groups.items():
            for i, address in enumerate(addresses):
                self._node(f"group-{gid}-{i}", ["surfshard", "--group", str(gid), "--node", str(i)], address)
        self.addCleanup(self.kill_all)
        self.load: subprocess.Popen[str] | None = None

    def _node(self, name: str, args: list[str], address: str) -> None:
        argv = [
            *twistd_command(),
            "--nodaemon",
            "--pidfile=",
            "--logfile=-",
            args[0],
            "--config",
            str(self.config),
        ]
        self.nodes[name] = NodeProcess(
            name, argv + args[1:], self.directory / "logs" / f"{name}.log", address
        )

    def kill_all(self) -> None:
        if self.load is not None and self.load.poll() is None:
            self.load.kill()
            self.load.wait()
        for node in self.nodes.values():
            node.kill()

    # -- helpers ------------------------------------------------------------------

    def logs(self, names: list[str] | None = None) -> str:
        chosen = names or list(self.nodes)
        return "\n".join(
            f"----- {self.nodes[n].describe()} -----\n{self.nodes[n].log_tail()}" for n in chosen
        )

    def native(
        self, address: str, method: str, args: dict[str, Any] | None = None, timeout: float = 3.0
    ) -> Any:
        try:
            with NativeClient(address, timeout=timeout) as client:
                return client.call(method, args)
        except SurfShardError:
            return None
        except OSError as e:
            if is_connection_error(e) or isinstance(e, TimeoutError):
                return None
            raise

    def wait_serving(self, name: str) -> None:
        node = self.nodes[name]

        def serving() -> bool:
            if not node.running:
                raise NodeExited(f"{node.describe()} exited while starting\n{node.log_tail()}")
            return self.native(node.address, "ping") is True

        wait_until(serving, START_TIMEOUT, 0.1, lambda: f"{node.describe()} never answered")

    def leader_of(self, gid: int) -> str:
        """The name of the node leading group ``gid``."""

        def one() -> str | None:
            for i, address in enumerate(self.groups[gid]):
                status = self.native(address, "status")
                if status and status.get("role") == "leader" and not status.get("crashed"):
                    return f"group-{gid}-{i}"
            return None

        return wait_until(one, 30.0, 0.05, lambda: f"no leader in group {gid}\n{self.logs()}")

    def group_status(self, gid: int) -> dict[str, Any] | None:
        name = self.leader_of(gid)
        return self.native(self.nodes[name].address, "status")

    def admin(self, *args: str) -> dict[str, Any]:
        argv = [
            sys.executable,
            "-m",
            "client.cli",
            "admin",
            "--config",
            str(self.config),
            "--timeout",
            "30",
            "--json",
        ]
        done = subprocess.run(
            argv + list(args),
            cwd=str(REPO_ROOT),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=ADMIN_TIMEOUT,
            check=False,
        )
        self.assertEqual(done.returncode, 0, f"admin {args}: {done.stdout} {done.stderr}")
        return json.loads(done.stdout)

    def settled(self, latest: dict[str, Any]) -> bool:
        for gid in GIDS:
            status = self.group_status(gid)
            if not status or status.get("shard_map") != latest["num"] or status.get("moving"):
                return False
            owned = [s for s, g in enumerate(latest["shards"]) if g == gid]
            if status.get("owned_shards") != owned:
                return False
        return True

    def restart(self, name: str) -> None:
        node = self.nodes[name]
        node.signal(signal.SIGKILL)
        node.kill()  # reaps it
        node.start()
        self.wait_serving(name)

    # -- the test ---------------------------------------------------------------------

    def test_moves_under_writers_with_both_leaders_killed_mid_transfer(self) -> None:
        for node in self.nodes.values():
            node.start()
        for name in self.nodes:
            self.wait_serving(name)
        self.admin("join", "1", *self.groups[1])
        wait_until(lambda: self.settled(self.admin("show")), 60, 0.2, lambda: self.logs())

        # Big files, all in group 1 for now.
        rng = random.Random(7)
        leader = self.nodes[self.leader_of(1)].address
        big: dict[str, list[str]] = {}
        for k in range(BIG_FILES):
            hashes = big[f"big-{k}"] = [f"{rng.getrandbits(256):064x}" for _ in range(BIG_HASHES)]
            args = {
                "name": f"big-{k}",
                "version": 1,
                "hashlist": hashes,
                "client_id": "preload",
                "seq": k + 1,
            }
            for _attempt in range(20):  # bounded; a leader change on a loaded machine moves us on
                try:
                    with NativeClient(leader, timeout=30) as client:
                        self.assertEqual(client.call("updatefile", args), 1)
                    break
                except errors.NotLeader:
                    leader = self.nodes[self.leader_of(1)].address
            else:
                self.fail("no leader took the preload")

        history = self.directory / "history.json"
        self.load = subprocess.Popen(
            [
                sys.executable,
                str(REPO_ROOT / "tests" / "migration_load.py"),
                "--config",
                str(self.config),
                "--seconds",
                "25",
                "--clients",
                "6",
                "--files",
                "30",
                "--out",
                str(history),
            ],
            cwd=str(REPO_ROOT),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.admin("join", "2", *self.groups[2])
        self.admin("join", "3", *self.groups[3])
        caught_mid_transfer = 0
        big_shards = sorted({shard_of(f"big-{k}", NSHARDS) for k in range(BIG_FILES)})
        deadline = time.monotonic() + 20  # bounded: moves stop before the load does
        moves = 0
        while time.monotonic() < deadline and moves < 4:
            latest = self.admin("show")
            wait_until(lambda: self.settled(self.admin("show")), 90, 0.2, lambda: self.logs())
            shard = big_shards[moves % len(big_shards)]
            source = latest["shards"][shard]
            target = next(g for g in GIDS if g != source and str(g) in latest["groups"])
            source_leader, target_leader = self.leader_of(source), self.leader_of(target)
            self.admin("move", str(shard), str(target))
            moves += 1

            def in_transit(target_leader: str = target_leader) -> bool:
                status = self.native(self.nodes[target_leader].address, "status", timeout=1.0) or {}
                return any(m.get("state") == "incoming" for m in status.get("moving", []))

            try:
                wait_until(in_transit, 10, 0.01, "no transfer seen")
                caught_mid_transfer += 1
            except Exception:
                pass  # it finished before we looked: the kills still land on the leaders
            self.restart(source_leader)
            self.restart(target_leader)
        self.assertGreater(caught_mid_transfer, 0, "no kill landed in the middle of a transfer")

        output, _ = self.load.communicate(timeout=240)
        self.assertEqual(self.load.returncode, 0, f"load failed:\n{output}\n{self.logs()}")
        wait_until(lambda: self.settled(self.admin("show")), 90, 0.2, lambda: self.logs())

        ops = json.loads(history.read_text())
        ok_writes = sum(1 for op in ops if op["result"] == "ok")
        self.assertGreater(ok_writes, 50, output)
        result = check_history(ops)
        self.assertTrue(result.ok, f"not linearizable: {result.explanation}")
        # The big files came through every move whole.
        latest = self.admin("show")
        for name, hashes in big.items():
            owner = latest["shards"][shard_of(name, NSHARDS)]
            got = self.native(
                self.nodes[self.leader_of(owner)].address, "getfileinfo", {"name": name}, timeout=30
            )
            self.assertEqual(got, [1, hashes], name)
        print(f"moves {moves}, kills mid-transfer {caught_mid_transfer}, load {output.strip()}")
