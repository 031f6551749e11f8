"""Logs an operator can use (issue 14, item 4): every line names the node;
``--log-format json`` writes one JSON object per line; the Raft core's
elections and leader changes reach the node's log."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

from twisted.logger import Logger, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from surfshard.observe.logs import bridge_stdlib_logging, observer
from tests.procs import NodeProcess, free_ports, twistd_command, wait_until


class FormatTests(SynchronousTestCase):
    def emit(self, log_format: str) -> str:
        out = io.StringIO()
        obs = observer("group-1-2", log_format, out)
        log = Logger(namespace="surfshard.test", observer=obs)
        log.info("leader is now node {leader} (term {term})", leader=3, term=7)
        return out.getvalue()

    def test_text_names_the_node_level_and_namespace(self) -> None:
        line = self.emit("text")
        self.assertRegex(line, r"^\S+ group-1-2 info surfshard\.test: leader is now node 3 \(term 7\)\n$")

    def test_json_is_one_object_per_line(self) -> None:
        (line,) = self.emit("json").splitlines()
        record = json.loads(line)
        self.assertEqual(
            (record["node"], record["level"], record["namespace"], record["message"]),
            ("group-1-2", "info", "surfshard.test", "leader is now node 3 (term 7)"),
        )
        self.assertEqual((record["leader"], record["term"]), (3, 7))

    def test_python_logging_reaches_the_twisted_log(self) -> None:
        seen: list[dict] = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        bridge_stdlib_logging()
        logging.getLogger("raft.core").info("raft node 1: became leader for term 4")
        self.assertTrue(any(e.get("msg") == "raft node 1: became leader for term 4" for e in seen))


class NodeLogTests(SynchronousTestCase):
    def test_a_node_logs_json_lines_with_its_name_and_its_elections(self) -> None:
        directory = Path(self.mktemp()).resolve()
        directory.mkdir()
        (port,) = free_ports(1)
        config = directory / "one.toml"
        config.write_text(
            f'[cluster]\nname = "one"\nshards = 1\ndata_dir = "data"\n[groups.1]\nnodes = ["127.0.0.1:{port}"]\n'
        )
        log = directory / "node.log"
        argv = [*twistd_command(), "--nodaemon", "--pidfile=", f"--logfile={log}", "surfshard"]
        argv += ["--config", str(config), "--group", "1", "--node", "0", "--log-format", "json"]
        node = NodeProcess("one", argv, directory / "out.log", f"127.0.0.1:{port}")
        node.start()
        self.addCleanup(node.kill)

        def records() -> list[dict] | None:
            if not log.exists():
                return None
            lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            return lines if any("leader is now" in (r.get("message") or "") for r in lines) else None

        lines = wait_until(records, 30.0, 0.1, lambda: (directory / "out.log").read_text())
        self.assertTrue(all(r["node"] == "group-1-0" for r in lines))
        # The core logs through Python logging: bridged into the same log.
        self.assertTrue(any("became leader for term" in (r.get("message") or "") for r in lines))
