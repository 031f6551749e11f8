"""A newcomer's session, end to end, with real processes on 127.0.0.1.

``surfshard up`` starts a whole sharded cluster (ShardMaster, two metadata
groups, a block store) from one config, joins the groups so every shard is
assigned, and stops every process it started on Ctrl-C. In between, the
other subcommands are driven as a user would: ``status``, ``put``, ``get``,
``ls``, ``admin show``, ``chaos crash/restore`` of a group leader, and the
blocking client from a script.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.procs import REPO_ROOT, addresses_of, free_ports, wait_until

CLI_TIMEOUT = 90.0
H1 = "1" * 64
H2 = "2" * 64


def write_cluster_config(directory: Path, ports: list[int]) -> Path:
    sm, g1, g2, bs = ports[0:3], ports[3:6], ports[6:9], ports[9:10]

    def nodes(p: list[int]) -> str:
        return ", ".join(f'"{a}"' for a in addresses_of(p))

    text = f"""
[cluster]
name = "cli-test"
shards = 6
data_dir = "data"
chaos = true

[shardmaster]
nodes = [{nodes(sm)}]

[groups.1]
nodes = [{nodes(g1)}]

[groups.2]
nodes = [{nodes(g2)}]

[blockstores]
nodes = [{nodes(bs)}]

[raft]
fsync = false
"""
    path = directory / "cluster.toml"
    path.write_text(text, encoding="utf-8")
    return path


class NewcomerSessionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir(parents=True)
        self.config = write_cluster_config(self.dir, free_ports(10))
        self.launcher_log = self.dir / "up.log"
        self.child_pids: list[int] = []
        self.launcher: subprocess.Popen[bytes] | None = None
        self.addCleanup(self._cleanup)

    def _cleanup(self) -> None:
        if self.launcher is not None and self.launcher.poll() is None:
            self.launcher.kill()
            self.launcher.wait(30)
        for pid in self.child_pids:  # only processes our launcher started
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "client.cli", *args, "--config", str(self.config)],
            cwd=self.dir,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )
        if check and proc.returncode != 0:
            self.fail(f"surfshard {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}\n{self._log()}")
        return proc

    def _log(self) -> str:
        return self.launcher_log.read_text(errors="replace")[-4000:] if self.launcher_log.exists() else ""

    def status(self) -> list[dict[str, Any]]:
        return json.loads(self.cli("status", "--json", check=False).stdout or "[]")

    def leader_of_group(self, gid: int) -> str | None:
        for node in self.status():
            st = node.get("status") or {}
            if (
                node["kind"] == "group"
                and node["gid"] == gid
                and st.get("role") == "leader"
                and not st.get("crashed")
            ):
                return node["address"]
        return None

    def start_up(self) -> None:
        """``surfshard up`` in the background, until its 10 nodes started."""
        with open(self.launcher_log, "wb") as log:
            self.launcher = subprocess.Popen(
                [sys.executable, "-m", "client.cli", "up", "--config", str(self.config), "--seconds", "600"],
                cwd=self.dir,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            )

        def started() -> list[int] | None:
            pids = [int(p) for p in re.findall(r"\(pid (\d+),", self._log())]
            return pids if len(pids) == 10 else None

        self.child_pids = wait_until(started, 60, message="the launcher to start 10 nodes")

    def assert_stopped_everything(self) -> None:
        assert self.launcher is not None
        self.assertEqual(self.launcher.wait(60), 0, self._log())
        self.assertIn("stopped 10 node(s)", self._log())
        for pid in self.child_pids:
            self.assertRaises(ProcessLookupError, os.kill, pid, 0)

    def test_sigterm_stops_every_node(self) -> None:
        # As a service manager stops it: only the launcher gets the signal.
        # (Before, the reactor's own SIGTERM handler replaced the launcher's,
        # and the launcher exited 1 with all ten nodes left running.)
        self.start_up()
        assert self.launcher is not None
        self.launcher.send_signal(signal.SIGTERM)
        self.assert_stopped_everything()

    def test_up_use_and_ctrl_c(self) -> None:
        self.start_up()

        def serving() -> bool:
            rows = self.status()
            return len(rows) == 10 and all("status" in r for r in rows)

        wait_until(serving, 90, interval=0.5, message=lambda: f"every node to answer status\n{self._log()}")

        # The launcher joined both groups: every shard is assigned and both
        # groups adopted theirs.
        def assigned() -> dict[str, Any] | None:
            shard_map = json.loads(self.cli("admin", "show", "--json", check=False).stdout or "{}")
            return shard_map if shard_map.get("shards") and 0 not in shard_map["shards"] else None

        shard_map = wait_until(assigned, 60, interval=0.5, message="the groups to be joined")
        self.assertEqual(sorted(set(shard_map["shards"])), [1, 2])

        names = [f"file-{i}.txt" for i in range(8)]
        for name in names:

            def put(name: str = name) -> bool:
                return self.cli("put", name, "1", H1, check=False).returncode == 0

            # The first writes may race the groups adopting their shards.
            wait_until(put, 60, interval=0.5, message=f"put {name}")
        mismatch = self.cli("put", names[0], "1", H2, check=False)
        self.assertEqual(mismatch.returncode, 1, mismatch.stderr)
        self.assertIn("version 1", mismatch.stderr)
        got = json.loads(self.cli("get", names[0], "--json").stdout)
        self.assertEqual(got, {"name": names[0], "version": 1, "hashlist": [H1]})
        listing = json.loads(self.cli("ls", "--json").stdout)
        self.assertEqual(sorted(listing), names)

        # Both groups hold some of the files.
        owners = {
            n["gid"] for n in self.status() if n["kind"] == "group" and (n["status"].get("files") or 0) > 0
        }
        self.assertEqual(owners, {1, 2})

        # ChaosMonkey: crash group 1's leader; writes go on via a new leader.
        old = wait_until(lambda: self.leader_of_group(1), 30, message="a leader in group 1")
        crash = json.loads(self.cli("chaos", "crash", old, "--json").stdout)
        crashed = [n for n in crash["status"] if n["address"] == old][0]
        self.assertTrue(crashed["status"]["crashed"])
        new = wait_until(lambda: self.leader_of_group(1), 30, message="a new leader in group 1")
        self.assertNotEqual(new, old)
        for name in names:
            self.cli("put", name, "2", H2)
        self.cli("chaos", "restore", old)

        # The blocking client, from a script, sees the same state.
        script = (
            "import sys\n"
            "from client.blocking import connect\n"
            "with connect(sys.argv[1], timeout=30) as c:\n"
            "    print(c.getfileinfo(sys.argv[2])[0], len(c.getfileinfomap()))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", script, str(self.config), names[3]],
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            cwd=self.dir,
        )
        self.assertEqual(out.stdout.split(), ["2", str(len(names))], out.stderr)

        # Ctrl-C: the launcher stops every node it started, then exits 0.
        assert self.launcher is not None
        self.launcher.send_signal(signal.SIGINT)
        self.assert_stopped_everything()


class OptionsAnywhereTests(SynchronousTestCase):
    def test_options_may_follow_the_positionals(self) -> None:
        from client.cli import build_parser, options_first

        parser = build_parser()
        for argv in (
            ["admin", "move", "--config", "c.toml", "0", "2"],
            ["admin", "move", "0", "2", "--config", "c.toml"],
            ["admin", "--config", "c.toml", "move", "0", "2"],
        ):
            args = parser.parse_args(options_first(parser, argv))
            self.assertEqual((args.action, args.params, args.config), ("move", ["0", "2"], "c.toml"), argv)
        args = parser.parse_args(options_first(parser, ["sync", "/tmp/x", "--json", "--block-size", "8192"]))
        self.assertEqual((args.basedir, args.json, args.block_size), ("/tmp/x", True, 8192))
        args = parser.parse_args(options_first(parser, ["admin", "query", "-1", "--json"]))
        self.assertEqual((args.params, args.json), (["-1"], True))
        args = parser.parse_args(options_first(parser, ["put", "a,b", "2", "0", "--config=c.toml"]))
        self.assertEqual((args.name, args.version, args.hashes, args.config), ("a,b", 2, ["0"], "c.toml"))


class StartUpTests(SynchronousTestCase):
    def test_the_sync_engine_is_loaded_only_by_the_commands_that_use_it(self) -> None:
        # Every command builds the whole parser: what it needs must not load
        # the sync client (a tenth of the start-up when it did).
        script = "import sys, client.cli; client.cli.build_parser(); print('client.sync' in sys.modules)"
        done = subprocess.run(
            [sys.executable, "-c", script], cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=60
        )
        self.assertEqual(done.stdout.strip(), "False", done.stderr)

    def test_the_help_states_the_default_a_sync_uses(self) -> None:
        from client.cli import build_parser
        from client.sync import DEFAULT_KEEP_VERSIONS_DAYS

        sync = build_parser()._subparsers._group_actions[0].choices["sync"]  # type: ignore[union-attr]
        self.assertIn(f"(default {DEFAULT_KEEP_VERSIONS_DAYS:.0f};", " ".join(sync.format_help().split()))


class VersionTests(SynchronousTestCase):
    def test_version_names_the_installed_distribution(self) -> None:
        import contextlib
        import io
        from importlib.metadata import version

        from client.cli import main

        out = io.StringIO()
        with contextlib.redirect_stdout(out), self.assertRaises(SystemExit) as exited:
            main(["--version"])
        self.assertEqual(exited.exception.code, 0)
        self.assertEqual(out.getvalue().strip(), f"surfshard {version('surfshard')}")


class MemberUsageTests(SynchronousTestCase):
    """``surfshard admin member`` refuses what it cannot do before calling
    anything, with exit status 2 and a line saying why."""

    def test_bad_member_commands_are_usage_errors(self) -> None:
        import contextlib
        import io

        from client.cli import main

        for argv, why in (
            (["admin", "member"], "list, add, remove or lead"),
            (["admin", "member", "grow", "1"], "list, add, remove or lead"),
            (["admin", "member", "list", "x"], "not a group id"),
            (["admin", "member", "list", "9"], "no group 9"),
            (["admin", "member", "list", "1", "2"], "only the group"),
            (["admin", "member", "list", "shardmaster", "2"], "only the group"),
            (["admin", "member", "add", "shardmaster"], "HOST:PORT"),
            (["admin", "member", "remove", "shardmaster", "-1"], "node's id"),
            (["admin", "member", "lead", "1"], "node's id"),
            (["admin", "member", "lead", "shardmaster", "x"], "node's id"),
            (["admin", "member", "lead", "1", "99999999"], "node's id"),
            (["admin", "member", "add", "1"], "HOST:PORT"),
            (["admin", "member", "add", "1", "nowhere"], "host:port"),
            (["admin", "member", "remove", "1", "zero"], "node's id"),
            (["admin", "member", "remove", "1", "0"], "node's id"),
            (["restore", "backup.jsonl", "--only", "[z-a]"], "'[z-a]' is not a pattern"),
            # blocks gc: a grace from none to a week, and no hashes
            (["blocks", "gc", "--grace", "-5"], "SECONDS from 0 to 604800"),
            (["blocks", "gc", "--grace", "nan"], "SECONDS from 0 to 604800"),
            (["blocks", "gc", "--grace", "604801"], "SECONDS from 0 to 604800"),
            (["blocks", "gc", "abc"], "usage: surfshard blocks gc"),
            # join takes the config's replicas of a group it has, else needs them
            (["admin", "join"], "GID"),
            (["admin", "join", "9"], "group 9 is not in the config"),
            # a static config has no ShardMaster to change
            (
                [
                    "admin",
                    "member",
                    "list",
                    "shardmaster",
                    "--config",
                    str(REPO_ROOT / "configs" / "single-group.toml"),
                ],
                "no [shardmaster]",
            ),
        ):
            err = io.StringIO()
            with contextlib.redirect_stderr(err):  # rich writes to sys.stderr as it is when it prints
                code = main(argv)
            self.assertEqual(code, 2, argv)
            self.assertIn(why, " ".join(err.getvalue().split()), argv)
