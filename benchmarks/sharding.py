"""Shard migration and scaling across groups, on real processes.

    python3 dev.py bench sharding [--sizes 10000,100000] [--writers 64] [--seconds 5] [--moves 3]

Starts a 3-node ShardMaster and three 3-node metadata groups as ``twistd``
processes on 127.0.0.1 (a generated config in a temp dir, fsync on), then:

1. **Aggregate throughput with 1, 2 and 3 groups**: ``--writers`` concurrent
   writers (8 client ids of 8 writers each, one connection pool; each writer
   its own files, spread over every shard) for ``--seconds`` with group 1
   alone, then with 2 and 3 groups joined. The machine's cores are shared by
   every process, so the figure to read is the ratio to one group, next to
   the number of cores.
2. **Moving a shard of N files** (for each of ``--sizes``): N files are
   written into one shard, then the shard is moved to another group,
   ``--moves`` times (back and forth), idle and then under the writers
   (which write to the other shards). For each move: the time from the
   ShardMaster's commit to the target serving the shard, and how long a
   prober writing to the moving shard every few milliseconds was refused
   (from its first refusal to its first success); under load, the other
   shards' throughput during the move as a ratio of before it.

Figures are printed, never asserted. Every process it starts is stopped by
pid at the end.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task

from client.cluster import ClusterClient
from client.metadata_client import MetadataClient
from surfshard import errors
from surfshard.config import load_config
from surfshard.net.pool import RpcClientPool
from surfshard.testing.keys import names_in_shard

NSHARDS = 8
ROOT = Path(__file__).resolve().parent.parent
HASHES = [f"{i:064x}" for i in range(1, 3)]


def free_ports(n: int) -> list[int]:
    import socket

    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def write_config(directory: Path) -> tuple[Path, list[str], dict[int, list[str]]]:
    ports = free_ports(12)
    sm = [f"127.0.0.1:{p}" for p in ports[:3]]
    groups = {g: [f"127.0.0.1:{p}" for p in ports[3 * g : 3 * g + 3]] for g in (1, 2, 3)}

    def nodes(addresses: list[str]) -> str:
        return ", ".join(f'"{a}"' for a in addresses)

    lines = ["[cluster]", 'name = "shardbench"', f"shards = {NSHARDS}", 'data_dir = "data"', ""]
    lines += ["[shardmaster]", f"nodes = [{nodes(sm)}]", ""]
    for gid, addresses in groups.items():
        lines += [f"[groups.{gid}]", f"nodes = [{nodes(addresses)}]", ""]
    lines += ["[raft]", "fsync = true", ""]
    path = directory / "cluster.toml"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path, sm, groups


class Processes:
    """The twistd processes this benchmark started, stopped by pid."""

    def __init__(self, config: Path, directory: Path) -> None:
        self.config, self.directory = config, directory
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str) -> None:
        twistd = str(Path(sys.executable).with_name("twistd"))
        log = open(self.directory / f"{'-'.join(args)}.log", "ab")
        argv = [
            twistd,
            "--nodaemon",
            "--pidfile=",
            "--logfile=-",
            args[0],
            "--config",
            str(self.config),
            *args[1:],
        ]
        self.procs.append(
            subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT)
        )

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 15
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def names_in(shard: int, count: int, prefix: str) -> list[str]:
    return names_in_shard(shard, count, NSHARDS, prefix)


class Load:
    """Writers on every shard but ``avoid``; counts successes with times."""

    def __init__(
        self, reactor: Any, cluster: Any, pool: RpcClientPool, writers: int, avoid: int | None
    ) -> None:
        self.reactor = reactor
        self.clients = [
            ClusterClient(cluster, reactor, pool=pool, timeout=30.0) for _ in range(max(1, writers // 8))
        ]
        self.writers = writers
        self.avoid = avoid
        self.running = False
        self.done: list[float] = []
        self.loops: list[defer.Deferred[Any]] = []

    def start(self) -> None:
        self.running = True
        for k in range(self.writers):
            self.loops.append(self._loop(k))

    @defer.inlineCallbacks
    def _loop(self, k: int) -> Any:
        client = self.clients[k % len(self.clients)]
        rng = random.Random(k)
        shards = [s for s in range(NSHARDS) if s != self.avoid]
        files = [names_in(rng.choice(shards), 1, f"w{k}-{j}-")[0] for j in range(4)]
        versions = [0] * len(files)
        j = 0
        while self.running:  # bounded: stop() ends it after the current call
            try:
                yield client.updatefile(files[j], versions[j] + 1, HASHES)
                versions[j] += 1
                self.done.append(time.monotonic())
            except errors.VersionMismatch as e:
                versions[j] = e.current or 0
            except errors.SurfShardError:
                yield task.deferLater(self.reactor, 0.01, lambda: None)
            j = (j + 1) % len(files)

    def rate(self, start: float, end: float) -> float:
        return sum(1 for t in self.done if start <= t < end) / max(1e-9, end - start)

    @defer.inlineCallbacks
    def stop(self) -> Any:
        self.running = False
        yield defer.DeferredList(self.loops)


@defer.inlineCallbacks
def wait_for(reactor: Any, predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # bounded by the deadline
        ok = yield predicate()
        if ok:
            return
        yield task.deferLater(reactor, 0.02, lambda: None)
    raise RuntimeError(f"timed out waiting for {what}")


@defer.inlineCallbacks
def status_of(pool: RpcClientPool, addresses: list[str]) -> Any:
    for a in addresses:
        try:
            s = yield pool.call(a, "status", {}, timeout=2.0)
        except errors.SurfShardError:
            continue
        if s.get("role") == "leader":
            return s
    return None


@defer.inlineCallbacks
def serves(pool: RpcClientPool, addresses: list[str], shard: int) -> Any:
    s = yield status_of(pool, addresses)
    return s is not None and shard in s.get("owned_shards", []) and not s.get("moving")


@defer.inlineCallbacks
def preload(reactor: Any, pool: RpcClientPool, addresses: list[str], names: list[str]) -> Any:
    """Write ``names`` (version 1) to the group at ``addresses``, 64 in flight."""
    clients = [MetadataClient(pool, addresses, reactor, timeout=60.0) for _ in range(8)]
    it = iter(names)

    @defer.inlineCallbacks
    def worker(c: MetadataClient) -> Any:
        for name in it:
            try:
                yield c.updatefile(name, 1, HASHES)
            except errors.VersionMismatch:
                pass

    yield defer.gatherResults([worker(clients[k % 8]) for k in range(64)])


@defer.inlineCallbacks
def timed_move(
    reactor: Any,
    sm: Any,
    pool: RpcClientPool,
    groups: dict[int, list[str]],
    shard: int,
    to: int,
    probe: ClusterClient,
) -> Any:
    """Move ``shard`` to group ``to``; (seconds until the target serves it,
    seconds the prober was refused)."""
    probe_name = names_in(shard, 1, "probe-")[0]
    state = {"version": 0, "refused_at": None, "refused": 0.0, "stop": False}
    info = yield probe.getfileinfo(probe_name)
    state["version"] = info[0]

    @defer.inlineCallbacks
    def prober() -> Any:
        while not state["stop"]:  # bounded: the move's end stops it
            t0 = time.monotonic()
            try:
                yield probe.updatefile(probe_name, state["version"] + 1, HASHES)
                state["version"] += 1
                if state["refused_at"] is not None:
                    state["refused"] = max(state["refused"], time.monotonic() - state["refused_at"])
                    state["refused_at"] = None
            except errors.VersionMismatch as e:
                state["version"] = e.current or 0
            except errors.SurfShardError:
                if state["refused_at"] is None:
                    state["refused_at"] = t0
            if time.monotonic() - t0 > 0.05 and state["refused_at"] is None:
                # A write that took long was held back by the move as well.
                state["refused"] = max(state["refused"], time.monotonic() - t0)
            yield task.deferLater(reactor, 0.002, lambda: None)

    running = prober()
    start = time.monotonic()
    yield sm.move(shard, to)
    yield wait_for(reactor, lambda: serves(pool, groups[to], shard), 600, f"shard {shard} on group {to}")
    moved = time.monotonic() - start
    # Let the prober see the shard serve again.
    yield task.deferLater(reactor, 0.3, lambda: None)
    state["stop"] = True
    yield running
    return moved, state["refused"], start, start + moved


@defer.inlineCallbacks
def main(reactor: Any, options: argparse.Namespace) -> Any:
    directory = Path(tempfile.mkdtemp(prefix="shardbench-"))
    config, sm_addresses, groups = write_config(directory)
    procs = Processes(config, directory)
    cluster = load_config(config)
    pool = RpcClientPool(reactor)
    try:
        for i in range(3):
            procs.start("shardmaster", "--node", str(i))
        for gid in groups:
            for i in range(3):
                procs.start("surfshard", "--group", str(gid), "--node", str(i))
        admin = ClusterClient(cluster, reactor, pool=pool, timeout=60.0)
        sm = admin.shardmaster
        yield wait_for(reactor, lambda: _ok(sm.query(-1)), 60, "the ShardMaster")
        yield sm.join({1: groups[1]})
        for s in range(NSHARDS):
            yield wait_for(reactor, lambda s=s: serves(pool, groups[1], s), 60, "group 1")
        print(
            f"cluster up: ShardMaster + 3 groups x 3 replicas, {NSHARDS} shards, fsync on, {os.cpu_count()} cores"
        )

        # 1. Aggregate throughput with 1, 2, 3 groups.
        rates = {}
        for n in (1, 2, 3):
            if n > 1:
                yield sm.join({n: groups[n]})
                latest = yield sm.query(-1)
                for s, g in enumerate(latest.shards):
                    yield wait_for(reactor, lambda s=s, g=g: serves(pool, groups[g], s), 120, "the join")
            load = Load(reactor, cluster, pool, options.writers, None)
            load.start()
            yield task.deferLater(reactor, 1.0, lambda: None)
            t0 = time.monotonic()
            yield task.deferLater(reactor, options.seconds, lambda: None)
            rates[n] = load.rate(t0, time.monotonic())
            yield load.stop()
            print(
                f"{n} group(s), {options.writers} writers: {rates[n]:8.0f} updatefile/s"
                f"  ({rates[n] / rates[1]:.2f}x one group; {rates[n] / (os.cpu_count() or 1):.0f}/s per core)"
            )

        # 2. Moving a shard of N files, idle and under load.
        latest = yield sm.query(-1)
        probe = ClusterClient(cluster, reactor, pool=pool, timeout=60.0)
        for size in options.sizes:
            shard = size % NSHARDS
            latest = yield sm.query(-1)
            owner = latest.shards[shard]
            t0 = time.monotonic()
            yield preload(reactor, pool, groups[owner], names_in(shard, size, f"n{size}-"))
            print(f"shard {shard}: {size} files written in {time.monotonic() - t0:.1f}s")
            for loaded in (False, True):
                load = Load(reactor, cluster, pool, options.writers, shard) if loaded else None
                if load is not None:
                    load.start()
                    yield task.deferLater(reactor, 1.0, lambda: None)
                moves, refusals, ratios = [], [], []
                for _ in range(options.moves):
                    latest = yield sm.query(-1)
                    source = latest.shards[shard]
                    to = 1 + (source % 3)
                    before_start = time.monotonic()
                    if load is not None:
                        yield task.deferLater(reactor, 1.0, lambda: None)
                    moved, refused, start, end = yield timed_move(reactor, sm, pool, groups, shard, to, probe)
                    moves.append(moved)
                    refusals.append(refused)
                    if load is not None:
                        before = load.rate(before_start, start)
                        during = load.rate(start, max(end, start + 0.2))
                        ratios.append(during / before if before else float("nan"))
                if load is not None:
                    yield load.stop()
                where = f"under {options.writers} writers" if loaded else "idle"
                line = (
                    f"move {size:>6} files, {where:>16}: time to serve p50 {statistics.median(moves):6.2f}s"
                    f" max {max(moves):6.2f}s; writes refused p50 {statistics.median(refusals) * 1000:7.0f} ms"
                    f" max {max(refusals) * 1000:7.0f} ms"
                )
                if ratios:
                    line += f"; other shards' throughput during the move {statistics.median(ratios):.2f}x of before"
                print(line, flush=True)
    finally:
        yield pool.close()
        procs.stop()
        shutil.rmtree(directory, ignore_errors=True)


@defer.inlineCallbacks
def _ok(d: defer.Deferred[Any]) -> Any:
    try:
        yield d
    except errors.SurfShardError:
        return False
    return True


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000", help="files in the moved shard (comma-separated)")
    parser.add_argument("--writers", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--moves", type=int, default=3)
    opts = parser.parse_args()
    opts.sizes = [int(s) for s in opts.sizes.split(",")]
    task.react(main, [opts])
