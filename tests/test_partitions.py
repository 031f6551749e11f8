"""Real partitions between real processes (issue 12, item 6).

A 3-replica metadata group runs as ``twistd`` processes, one per network
namespace (``tests/netns.py``), with clients in a fourth; a seeded nemesis
cuts links with iptables (majority/minority splits, a bridge where one node
sees both sides, one node isolated), pauses nodes (SIGSTOP/SIGCONT) and
kills them (SIGKILL, restarted from disk) while the clients write and read.
The history, with a final read of every file, is checked for
linearizability: no acknowledged write may be lost or seen out of order.

Runs as root where namespaces, a bridge and iptables are available (CI
installs iptables); elsewhere it skips with the reason. Every run is
bounded in time, and every process and namespace it made is removed, even
on failure. ``SURFSHARD_SEED`` replays a run; ``SURFSHARD_NEMESIS_RUNS``
runs more of them.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from raft.testing.simnet import sim_seeds
from tests.migration_load import check_history
from tests.netns import Lab
from tests.procs import twistd_node_argv

REPO_ROOT = Path(__file__).resolve().parent.parent
NODES = 3
PORT = 7000
LOAD_SECONDS = 30.0


def write_config(directory: Path, addresses: list[str]) -> Path:
    nodes = ", ".join(f'"{a}:{PORT}"' for a in addresses)
    path = directory / "partitions.toml"
    path.write_text(
        "\n".join(
            [
                "[cluster]",
                'name = "partitions"',
                "shards = 4",
                f'data_dir = "{directory / "data"}"',
                "",
                "[groups.1]",
                f"nodes = [{nodes}]",
                "",
            ]
        ),
        encoding="utf-8",
    )
    return path


class Nemesis:
    """Seeded faults on a lab: one at a time, each healed before the next."""

    def __init__(self, lab: Lab, config: Path, directory: Path, rng: random.Random) -> None:
        self.lab = lab
        self.config = config
        self.directory = directory
        self.rng = rng
        self.counts = {"partition": 0, "bridge": 0, "isolate": 0, "pause": 0, "kill": 0}
        self.log: list[str] = []

    def start_node(self, i: int) -> None:
        self.lab.start(
            f"node{i}", i, twistd_node_argv(self.config, i), self.directory / "logs" / f"node{i}.log"
        )

    def step(self, until: float) -> None:
        """Inject one fault, hold it a while, undo it, let the group settle."""
        rng, lab = self.rng, self.lab
        nodes = list(range(NODES))
        client = NODES
        kind = rng.choice(list(self.counts))
        hold = rng.uniform(0.5, 3.0)
        self.counts[kind] += 1
        if kind == "partition":
            minority = [rng.choice(nodes)]
            majority = [n for n in nodes if n not in minority]
            # The clients land on one side or the other.
            (majority if rng.random() < 0.5 else minority).append(client)
            self.log.append(f"partition {majority} | {minority} for {hold:.1f}s")
            lab.partition(majority, minority)
        elif kind == "bridge":
            a, b = rng.sample(nodes, 2)
            self.log.append(f"bridge: cut {a}-{b}, {[n for n in nodes if n not in (a, b)]} sees both")
            lab.cut(a, b)
        elif kind == "isolate":
            victim = rng.choice(nodes)
            self.log.append(f"isolate {victim} for {hold:.1f}s")
            lab.partition([victim], [n for n in [*nodes, client] if n != victim])
        elif kind == "pause":
            victim = rng.choice(nodes)
            self.log.append(f"pause {victim} for {hold:.1f}s")
            lab.signal(f"node{victim}", signal.SIGSTOP)
        else:
            victim = rng.choice(nodes)
            self.log.append(f"kill {victim}, restart after {hold:.1f}s")
            lab.kill(f"node{victim}")
        time.sleep(max(0.0, min(hold, until - time.monotonic())))
        if kind == "pause":
            lab.signal(f"node{victim}", signal.SIGCONT)
        elif kind == "kill":
            self.start_node(victim)
        lab.heal()
        time.sleep(max(0.0, min(rng.uniform(0.5, 2.0), until - time.monotonic())))


class PartitionTests(SynchronousTestCase):
    def setUp(self) -> None:
        why = Lab.unavailable()
        if why is not None:
            raise SkipTest(why)

    def run_once(self, seed: int) -> dict[str, object]:
        directory = Path(self.mktemp()).resolve()
        directory.mkdir(parents=True)
        lab = Lab(NODES + 1, seed)
        self.addCleanup(lab.close)  # on failure; a run that ends well closes it at once
        lab.open()
        try:
            return self.run_in(lab, directory, seed)
        finally:
            lab.close()

    def run_in(self, lab: Lab, directory: Path, seed: int) -> dict[str, object]:
        config = write_config(directory, lab.addresses[:NODES])
        nemesis = Nemesis(lab, config, directory, random.Random(seed))
        for i in range(NODES):
            nemesis.start_node(i)
        history = directory / "history.json"
        load = lab.start(
            "load",
            NODES,
            [
                sys.executable,
                str(REPO_ROOT / "tests" / "migration_load.py"),
                "--config",
                str(config),
                "--seconds",
                str(LOAD_SECONDS),
                "--clients",
                "6",
                "--files",
                "12",
                "--seed",
                str(seed),
                "--call-timeout",
                "10",
                "--final-timeout",
                "60",
                "--out",
                str(history),
            ],
            directory / "logs" / "load.log",
            cwd=str(REPO_ROOT),
        )
        started = time.monotonic()
        # The load's first seconds see a healthy group; then faults until
        # shortly before it stops, so its final reads find the group whole.
        time.sleep(3.0)
        until = started + LOAD_SECONDS - 3.0
        while time.monotonic() < until:  # bounded by the deadline
            nemesis.step(until)
        lab.heal()
        try:
            load.wait(LOAD_SECONDS + 120)
        except subprocess.TimeoutExpired:
            self.fail(f"seed={seed}: the load did not finish; faults: {nemesis.log}")
        log = (directory / "logs" / "load.log").read_text(errors="replace")
        self.assertEqual(load.returncode, 0, f"seed={seed}: load failed:\n{log[-3000:]}")
        ops = json.loads(history.read_text())
        result = check_history(ops)
        self.assertTrue(
            result.ok,
            f"seed={seed} (replay with SURFSHARD_SEED={seed}): not linearizable: {result.explanation}",
        )
        ok = sum(1 for op in ops if op["result"] in ("ok", "value"))
        self.assertGreater(ok, 50, f"seed={seed}: too little got through: {log[-500:]}")
        return {"ops": len(ops), "completed": ok, **nemesis.counts}

    def test_linearizable_under_partitions_pauses_and_kills(self) -> None:
        seeds = sim_seeds(int(os.environ.get("SURFSHARD_NEMESIS_RUNS", "1")), env="SURFSHARD")
        runs = len(seeds)
        totals: dict[str, int] = {}
        for seed in seeds:
            figures = self.run_once(seed)
            for key, value in figures.items():
                totals[key] = totals.get(key, 0) + int(value)  # type: ignore[call-overload]
        print(f"runs {runs}, anomalies 0: {json.dumps(totals)}")
