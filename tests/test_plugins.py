"""The twistd plugin and run-server.sh as a user meets them: ``twistd --help``
lists ``surfshard``, ``twistd surfshard --help`` explains itself, and a bad
command line or config is a clear message on stderr and a non-zero exit,
never a traceback or a half-started server.

Every command runs in a fresh temp directory, so the plugin must be found
through the installation, not because the working directory happens to be
the source tree.
"""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests import procs

#: A twistd start-up costs about a second on a loaded machine; this only
#: bounds a hang.
COMMAND_TIMEOUT = 60.0


class PluginCommandLineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.workdir = Path(self.mktemp()).resolve()
        self.workdir.mkdir(parents=True)

    def run_command(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            argv,
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
        )
        # Whatever happened, nothing may be left behind in the working directory
        # (no twistd.pid or twistd.log from a server that half started).
        self.assertEqual(sorted(p.name for p in self.workdir.iterdir()), [], f"{argv}: left files behind")
        return result

    def twistd(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run_command([*procs.twistd_command(), *args])

    def assert_refused(self, result: subprocess.CompletedProcess[str], *needles: str) -> None:
        output = result.stdout + result.stderr
        self.assertNotEqual(result.returncode, 0, output)
        self.assertNotIn("Traceback", output)
        for needle in needles:
            self.assertIn(needle, output)

    def write(self, name: str, text: str) -> Path:
        path = self.workdir.parent / name
        path.write_text(text, encoding="utf-8")
        return path

    def test_twistd_help_lists_the_plugin(self) -> None:
        result = self.twistd("--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        commands = [line.split() for line in result.stdout.splitlines() if line.startswith("    ")]
        entry = [words for words in commands if words and words[0] == "surfshard"]
        self.assertTrue(entry, f"surfshard is not among the commands:\n{result.stdout}")
        self.assertIn("replica", " ".join(entry[0]).lower())

    def test_plugin_help(self) -> None:
        result = self.twistd("surfshard", "--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        for option in ("--config", "--group", "--node", "--chaos", "--no-fsync"):
            self.assertIn(option, result.stdout)

    def test_missing_config_file(self) -> None:
        missing = self.workdir.parent / "no-such-cluster.toml"
        result = self.twistd("-n", "surfshard", "--config", str(missing), "--group", "1", "--node", "0")
        self.assert_refused(result, str(missing), "cannot read the file")

    def test_bad_configs(self) -> None:
        cases = {
            "typo.toml": (
                '[cluster]\nshards = 4\n[groups.1]\nnodes = ["127.0.0.1:7101"]\n[raft]\nelection_tick = 9\n',
                ["typo.toml", "raft.election_tick", "is not a known key"],
            ),
            "short.txt": ("M: 3\nmetadata0: 127.0.0.1:7901\n", ["short.txt", "M", "metadata0 .. metadata2"]),
        }
        for name, (text, needles) in cases.items():
            path = self.write(name, text)
            result = self.twistd("-n", "surfshard", "--config", str(path), "--group", "1", "--node", "0")
            self.assert_refused(result, *needles)

    def test_bad_group_and_node(self) -> None:
        config = procs.write_surfstore_config(self.workdir.parent, [7901, 7902, 7903])
        result = self.twistd("-n", "surfshard", "--config", str(config), "--group", "2", "--node", "0")
        self.assert_refused(result, "no group 2")
        result = self.twistd("-n", "surfshard", "--config", str(config), "--group", "1", "--node", "3")
        self.assert_refused(result, "nodes 0..2")
        result = self.twistd("-n", "surfshard", "--config", str(config), "--node", "0")
        self.assert_refused(result, "--group and --node are required")

    def test_run_server_usage(self) -> None:
        result = self.run_command([str(procs.RUN_SERVER), "only-one-argument"])
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertIn("usage:", result.stderr)


class ServerProcessLifecycleTests(SynchronousTestCase):
    """A replica process started by twistd, as an operator sees it: a port
    it cannot have is a non-zero exit with the reason (not a process that
    runs Raft with no port), SIGTERM is a clean exit, and the test helper
    moves a group off a port something else took."""

    def setUp(self) -> None:
        self.cluster = procs.Cluster.toml(Path(self.mktemp()), 1, name="lifecycle")
        self.addCleanup(self.cluster.cleanup)

    def hold_port(self, port: int) -> None:
        holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(holder.close)
        holder.bind((procs.HOST, port))
        holder.listen()

    def test_port_in_use_exits_non_zero(self) -> None:
        self.hold_port(self.cluster.ports[0])
        node = self.cluster.nodes[0]
        node.start()
        procs.wait_until(
            lambda: not node.running, COMMAND_TIMEOUT, 0.05, "the node kept running without a port"
        )
        self.assertNotEqual(node.returncode, 0)
        log = node.log_text()
        self.assertIn(f"cannot listen on {self.cluster.addresses[0]}", log)
        self.assertIn("Address already in use", log)

    def test_start_all_moves_off_a_taken_port(self) -> None:
        taken = self.cluster.ports[0]
        self.hold_port(taken)
        self.cluster.start_all()
        self.assertNotEqual(self.cluster.ports[0], taken)
        self.assertIn(str(self.cluster.ports[0]), self.cluster.config.read_text())
        self.assertIs(self.cluster.proxy(0).surfstore.ping(), True)

    def test_sigterm_is_a_clean_exit(self) -> None:
        self.cluster.start_all()
        # twistd shuts the services down, then re-raises the signal so the
        # parent sees how it ended.
        self.assertEqual(self.cluster.terminate(0), -signal.SIGTERM)
        log = self.cluster.nodes[0].log_text()
        self.assertIn("Received SIGTERM, shutting down.", log)
        self.assertIn("Server Shut Down", log)
        self.assertNotIn("Traceback", log)
        # The data directory is free again (its lock released): it restarts.
        self.cluster.start(0)
        self.assertIs(self.cluster.proxy(0).surfstore.ping(), True)
