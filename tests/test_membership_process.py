"""Membership change with real processes: a 3-node ShardMaster and a 3-node
metadata group as ``twistd`` processes on 127.0.0.1, the group grown to 5
replicas (``surfshard admin member add``, each new replica started with the
``--node``/``--address`` the command prints) and shrunk back to 3 (removing
one added replica and then the leader, which hands over first), while 16
writers run (``tests/migration_load.py``, a subprocess with its own reactor).
The writers must see no error beyond what their library retries, the history
must be linearizable, and the ShardMaster must end up listing the group's
new addresses.

Every process started here is killed by pid in cleanup.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from twisted.python import log
from twisted.trial.unittest import SynchronousTestCase

from tests.migration_load import check_history
from tests.procs import REPO_ROOT, NodeProcess, addresses_of, free_ports, twistd_command, wait_until
from tests.test_migration_process import ADMIN_TIMEOUT, write_config

START_TIMEOUT = 60.0


class MembershipProcessTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = Path(self.mktemp()).resolve()
        self.directory.mkdir(parents=True)
        ports = free_ports(8)
        self.sm = addresses_of(ports[:3])
        self.group = addresses_of(ports[3:6])
        self.spare = addresses_of(ports[6:8])
        self.config = write_config(self.directory, self.sm, {1: self.group})
        self.nodes: dict[str, NodeProcess] = {}
        for i, address in enumerate(self.sm):
            self._node(f"shardmaster-{i}", ["shardmaster", "--node", str(i)], address)
        for i, address in enumerate(self.group):
            self._node(f"group-1-{i}", ["surfshard", "--group", "1", "--node", str(i)], address)
        self.load: subprocess.Popen[str] | None = None
        self.addCleanup(self.kill_all)

    def _node(self, name: str, args: list[str], address: str) -> NodeProcess:
        argv = [*twistd_command(), "--nodaemon", "--pidfile=", "--logfile=-", args[0]]
        argv += ["--config", str(self.config), *args[1:]]
        node = self.nodes[name] = NodeProcess(name, argv, self.directory / "logs" / f"{name}.log", address)
        return node

    def kill_all(self) -> None:
        if self.load is not None and self.load.poll() is None:
            self.load.kill()
            self.load.wait()
        for node in self.nodes.values():
            node.kill()

    def logs(self) -> str:
        return "\n".join(f"----- {n.describe()} -----\n{n.log_tail()}" for n in self.nodes.values())

    def cli(self, *args: str) -> Any:
        argv = [sys.executable, "-m", "client.cli", "admin", "--config", str(self.config), "--json"]
        done = subprocess.run(
            [*argv, "--timeout", "30", *args],
            cwd=str(REPO_ROOT),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=ADMIN_TIMEOUT,
            check=False,
        )
        self.assertEqual(done.returncode, 0, f"admin {args}: {done.stdout} {done.stderr}\n{self.logs()}")
        return json.loads(done.stdout)

    def members(self) -> dict[str, Any]:
        return self.cli("member", "list", "1")["members"]

    def voters(self) -> list[str]:
        return sorted(m["address"] for m in self.members()["voters"])

    def wait_serving(self, node: NodeProcess) -> None:
        from tests.procs import NativeClient

        def serving() -> bool:
            try:
                with NativeClient(node.address, timeout=2.0) as c:
                    return c.call("ping") is True
            except Exception:
                return False

        wait_until(
            serving, START_TIMEOUT, 0.1, lambda: f"{node.describe()} never answered\n{node.log_tail()}"
        )

    def test_grow_to_five_and_shrink_back_to_three_under_sixteen_writers(self) -> None:
        for node in self.nodes.values():
            node.start()
        for node in self.nodes.values():
            self.wait_serving(node)
        self.cli("join", "1", *self.group)
        history = self.directory / "history.json"
        load_argv = [
            sys.executable,
            str(REPO_ROOT / "tests" / "migration_load.py"),
            "--config",
            str(self.config),
        ]
        # The writers run until the changes are done (told by a file), at
        # most two minutes: a slow machine takes longer over the changes,
        # and they must all happen while the writers run.
        stop = self.directory / "stop-writers"
        load_argv += ["--seconds", "120", "--clients", "16", "--files", "40", "--out", str(history)]
        load_argv += ["--stop-file", str(stop)]
        self.load = subprocess.Popen(
            load_argv,
            cwd=str(REPO_ROOT),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        started = time.monotonic()
        # Grow: 3 -> 4 -> 5 voters.
        for address in self.spare:
            added = self.cli("member", "add", "1", address)["result"]
            self.assertTrue(added["added"], added)
            node = self._node(
                f"group-1-{added['id'] - 1}",
                ["surfshard", "--group", "1", "--node", str(added["id"] - 1), "--address", address],
                address,
            )
            node.start()
            wait_until(
                lambda address=address: address in self.voters(),
                60,
                0.2,
                lambda address=address: f"{address} never became a voter: {self.members()}\n{self.logs()}",
            )
        self.assertEqual(len(self.voters()), 5)
        # Shrink: remove the last added replica, then the leader (handed over first).
        listing = self.members()
        last = max(m["id"] for m in listing["voters"])
        self.cli("member", "remove", "1", str(last))
        self.nodes[f"group-1-{last - 1}"].kill()
        leader = self.members()["leader"]
        removed = self.cli("member", "remove", "1", str(leader))
        self.assertTrue(removed["result"]["removed"], removed)
        self.nodes[f"group-1-{leader - 1}"].kill()
        final = self.voters()
        self.assertEqual(len(final), 3, final)
        changed_after = time.monotonic() - started
        # The ShardMaster lists the group's addresses as they are now.
        wait_until(
            lambda: sorted(self.cli("show")["groups"]["1"]) == final,
            30,
            0.2,
            lambda: f"shard master lists {self.cli('show')['groups']['1']}, the group is {final}",
        )
        self.assertIsNone(self.load.poll(), "the writers stopped before the changes were all done")
        stop.touch()
        output, _ = self.load.communicate(timeout=240)
        self.assertEqual(self.load.returncode, 0, f"load failed:\n{output}\n{self.logs()}")
        ops = json.loads(history.read_text())
        counts = json.loads(output.strip().splitlines()[-1])
        # No error seen by the writers beyond the retries their library does.
        self.assertEqual(
            counts.get("unknown", 0), 0, f"{counts}: {[o for o in ops if o['result'] == 'unknown'][:5]}"
        )
        self.assertGreater(counts.get("ok", 0), 200, counts)
        result = check_history(ops)
        self.assertTrue(result.ok, f"not linearizable: {result.explanation}")
        # For the record (in _trial_temp/test.log): what the writers saw.
        log.msg(f"membership under load: {counts}, changes done {changed_after:.1f} s into the run")
