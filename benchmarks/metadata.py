"""updatefile throughput, latency and failover of a real 3-node metadata group,
next to a PySyncObj cluster doing the same work.

    python3 dev.py bench metadata [--seconds 3] [--warmup 1] [--rounds 3] [--trials 10]
        [--quick] [--clients 1,16,64] [--only surfshard|pysyncobj|none]
        [--no-failover] [--pysyncobj-batch] [--profile] [--keep] [--json FILE]

What runs (everything on 127.0.0.1, free ports, state in a temp dir):

- SurfShard: a 3-node group as real ``twistd surfshard`` processes from a
  generated TOML config with the default Raft timings (50 ms ticks,
  heartbeat every 2 ticks, elections after 6-12 ticks); ``[raft] fsync`` on,
  then a new group (empty data dirs) with fsync off.
- PySyncObj (``benchmarks/_pysyncobj_node.py``): 3 processes, each a
  ``SyncObj`` with a replicated file map and ``updatefile`` with the same
  version rule and dedup, behind a front end that speaks SurfShard's native
  protocol. Timings matched: 50 ms tick (``autoTickPeriod``), heartbeat
  100 ms (``appendEntriesPeriod``), elections 310-600 ms (PySyncObj insists
  on ``raftMinTimeout`` > 3 x ``appendEntriesPeriod``), log compaction every
  10,000 entries like SurfShard's snapshots. "fsync on" is its
  ``journalFile`` mode, "fsync off" its in-memory log. NOTE: PySyncObj's
  journal is an mmap'ed file that is never fsynced while it runs (see the
  helper's docstring): it is as durable as SurfShard with fsync OFF
  (survives a killed process, not a power cut), so the report also sets
  SurfShard fsync-off against the PySyncObj journal, the like-for-like
  pair. PySyncObj runs with ``appendEntriesUseBatch=False`` (each command
  goes to the followers at once); with its default batching every entry
  waits for the next 100 ms heartbeat (about 10 ops/s per client, 600
  ops/s at 64 clients here), so ``--pysyncobj-batch`` is there only to show
  that.
- Per fsync mode both clusters are up at once and the two systems are
  measured back to back at each concurrency, in alternating order, so a
  change in the machine's other load (it is shared) hits both alike; the
  idle cluster only exchanges heartbeats meanwhile. The sweep over the
  concurrency levels is repeated ``--rounds`` times and each figure is the
  median over the rounds (the ops/s of every round are printed too).
- Load: ONE load-generator process per cluster
  (``benchmarks/_metadata_load.py``), separate from the servers: N writers
  (a ``MetadataClient`` each: own client id and files, version = previous
  + 1, so no conflicts), pipelined over one connection per node through a
  shared ``RpcClientPool``. The same code drives both systems. Its CPU use
  is printed ("client cpu", in cores): it stays well under one core, so one
  process is not the bottleneck (on 2 cores a second one would only take
  CPU from the servers). Each cell warms up first and counts only
  successful writes; errors are counted by type.
- Failover (fsync-on mode): with 16 writers running, SIGKILL the leader's
  process and time from the kill to the first write acknowledged by another
  node (the new leader). The killed node is restarted from its data dir
  after each trial and the group settles (all nodes answer, one leader,
  followers caught up) before the next trial.

"server cpu" is the CPU time of the three server processes (utime + stime
from /proc/PID/stat) per successful write, warm-up included, and "leader"
the leader's share: the leader's CPU per write is what caps throughput, and
it varies less with the machine's other load than ops/s do. Every process
this starts is stopped by pid (SIGTERM, then SIGKILL) on exit, error or
Ctrl-C.

``--profile`` also runs a SurfShard fsync-off group under twistd's cProfile
(``twistd --profile``) at the highest ``--clients`` count and prints the
leader's and a follower's top functions (``--only none --profile`` does only
that; ``--keep`` keeps the .prof files). Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pstats
import random
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cbor2

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
LOAD_SCRIPT = ROOT / "benchmarks" / "_metadata_load.py"
PYSYNCOBJ_SCRIPT = ROOT / "benchmarks" / "_pysyncobj_node.py"
START_TIMEOUT = 60.0
FAILOVER_CLIENTS = 16
FAILOVER_TIMEOUT = 20.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
_PREFIX = struct.Struct(">I")


# ---------------------------------------------------------------------------
# Small blocking helpers
# ---------------------------------------------------------------------------


#: Ports handed out in this run: no two clusters of one run share one.
_HANDED_OUT: set[int] = set()


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(count: int) -> list[int]:
    """Distinct loopback ports that were free a moment ago, below the
    ephemeral range (so no outgoing connection's own port takes one before
    its server binds it) and never handed out before in this run."""
    rng = random.Random()
    top = max(_ephemeral_low() - 1, 12000)
    socks: list[socket.socket] = []
    try:
        for _ in range(50 * count):  # bounded: taken or busy ports are skipped
            if len(socks) == count:
                break
            port = rng.randint(10000, top)
            if port in _HANDED_OUT:
                continue
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind((HOST, port))
            except OSError:
                s.close()
                continue
            socks.append(s)
            _HANDED_OUT.add(port)
        if len(socks) != count:
            raise RuntimeError(f"found only {len(socks)} of {count} free ports")
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def native_call(address: str, method: str, args: dict[str, Any] | None = None, timeout: float = 2.0) -> Any:
    """One call over the native protocol on a fresh connection; returns the
    ``ok`` value or raises RuntimeError (with the error map) or OSError."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        payload = cbor2.dumps({"id": 1, "method": method, "args": args or {}})
        sock.sendall(_PREFIX.pack(len(payload)) + payload)
        buf = b""
        deadline = time.monotonic() + timeout
        while True:
            if len(buf) >= 4:
                (size,) = _PREFIX.unpack_from(buf)
                if len(buf) >= 4 + size:
                    reply = cbor2.loads(buf[4 : 4 + size])
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{method} to {address}: no reply")
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"{method} to {address}: connection closed")
            buf += chunk
    if "error" in reply:
        raise RuntimeError(reply["error"])
    return reply["ok"]


def try_status(address: str) -> dict[str, Any] | None:
    try:
        return native_call(address, "status", timeout=1.0)
    except (OSError, RuntimeError, ValueError, cbor2.CBORDecodeError):
        return None


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """The first value of ``predicate()`` that is neither None nor False.
    (0 counts: etcd's leader may be member 0, and a truth test here once
    took that for "no leader yet" and dropped the etcd column.)"""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):  # bounded
        value = predicate()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            break
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


def proc_cpu_seconds(pid: int) -> tuple[float, float]:
    """(utime, stime) of a live process ((0, 0) if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------


class Processes:
    """Every child this benchmark starts, so all of them are stopped, by pid."""

    def __init__(self) -> None:
        self.children: dict[str, subprocess.Popen] = {}

    def start(self, key: str, argv: list[str], log: Path, **kwargs: Any) -> subprocess.Popen:
        if key in self.children and self.children[key].poll() is None:
            raise RuntimeError(f"{key} is already running")
        with open(log, "ab") as out:
            # A session of its own: a Ctrl-C in the terminal reaches only us,
            # and we stop the children in order.
            proc = subprocess.Popen(
                argv,
                cwd=kwargs.pop("cwd", ROOT),
                stdout=kwargs.pop("stdout", out),
                stderr=out,
                start_new_session=True,
                **kwargs,
            )
        self.children[key] = proc
        return proc

    def kill(self, key: str) -> None:
        proc = self.children.pop(key)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop(self, key: str, grace: float = 5.0) -> None:
        proc = self.children.pop(key, None)
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait()

    def stop_all(self) -> None:
        for key in list(self.children):
            self.stop(key)


# ---------------------------------------------------------------------------
# Clusters
# ---------------------------------------------------------------------------


class Cluster:
    """Three replicas as processes; subclasses say how to run one."""

    system = "?"

    def __init__(self, procs: Processes, workdir: Path, durable: bool) -> None:
        self.procs = procs
        self.workdir = workdir
        self.durable = durable
        self.addresses: list[str] = []  # where clients call each node

    def key(self, i: int) -> str:
        return f"{self.system}-{i}"

    def start_node(self, i: int) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for i in range(3):
            self.start_node(i)
        self.wait_settled(START_TIMEOUT)

    def stop(self) -> None:
        for i in range(3):
            self.procs.stop(self.key(i))

    def cpu_by_node(self) -> list[tuple[float, float]]:
        """(user, system) CPU seconds used so far by each node's current process."""
        cpu = []
        for i in range(3):
            proc = self.procs.children.get(self.key(i))
            cpu.append(proc_cpu_seconds(proc.pid) if proc is not None else (0.0, 0.0))
        return cpu

    def check_alive(self) -> None:
        for i in range(3):
            proc = self.procs.children.get(self.key(i))
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{self.key(i)} exited with {proc.returncode}; see {self.log(i)}")

    def log(self, i: int) -> Path:
        return self.workdir / f"node-{i}.log"

    def load_args(self) -> list[str]:
        """How the load generator reaches this cluster."""
        return list(self.addresses)

    def leader(self) -> int | None:
        """The index of the node every live node agrees leads, if any."""
        statuses = [try_status(a) for a in self.addresses]
        leaders = [i for i, s in enumerate(statuses) if s and s.get("role") == "leader"]
        if len(leaders) != 1:
            return None
        return leaders[0]

    def wait_settled(self, timeout: float) -> int:
        """Wait until all three nodes answer, agree on one leader, and the
        followers have applied what the leader had committed when we looked."""
        self.check_alive()

        def settled() -> int | None:
            self.check_alive()
            statuses = [try_status(a) for a in self.addresses]
            if not all(statuses):
                return None
            leaders = [i for i, s in enumerate(statuses) if s.get("role") == "leader"]
            if len(leaders) != 1:
                return None
            leader = leaders[0]
            target = statuses[leader]["commit"]
            if any(s.get("leader_address") != self.addresses[leader] for s in statuses):
                return None
            return (leader, target)

        leader, target = wait_for(settled, timeout, f"{self.system} to elect a leader")

        def caught_up() -> bool:
            self.check_alive()
            statuses = [try_status(a) for a in self.addresses]
            # PySyncObj also reports its peer connections: a trial must start
            # with every pair connected, as a healthy cluster is.
            return all(
                s and s.get("applied", 0) >= target and s.get("peers_connected", 2) == 2 for s in statuses
            )

        wait_for(caught_up, timeout, f"{self.system} followers to catch up")
        return leader


class SurfShardCluster(Cluster):
    system = "SurfShard"

    def __init__(self, procs: Processes, workdir: Path, durable: bool, profile: bool = False) -> None:
        super().__init__(procs, workdir, durable)
        self.profile = profile
        self.addresses = [f"{HOST}:{p}" for p in free_ports(3)]
        self.config = workdir / "cluster.toml"
        workdir.mkdir(parents=True, exist_ok=True)
        nodes = ", ".join(f'"{a}"' for a in self.addresses)
        self.config.write_text(
            "[cluster]\n"
            'name = "bench"\n'
            "shards = 1\n"
            f'data_dir = "{workdir / "data"}"\n\n'
            "[groups.1]\n"
            f"nodes = [{nodes}]\n\n"
            "[raft]\n"
            f"fsync = {'true' if durable else 'false'}\n"
        )

    def profile_path(self, i: int) -> Path:
        return self.workdir / f"node-{i}.prof"

    def start_node(self, i: int) -> None:
        argv = [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "--nodaemon",
            "--pidfile=",
        ]
        argv.append(f"--logfile={self.log(i)}")
        if self.profile:
            argv += [f"--profile={self.profile_path(i)}", "--profiler=cprofile", "--savestats"]
        argv += ["surfshard", "--config", str(self.config), "--group", "1", "--node", str(i)]
        self.procs.start(self.key(i), argv, self.workdir / f"node-{i}.out")


def ensure_etcd() -> str | None:
    """None when etcd and etcdctl are here (installed from Debian's
    packages if missing and we may), else why not."""
    if shutil.which("etcd") and shutil.which("etcdctl"):
        return None
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        print("installing etcd-server and etcd-client from Debian's packages for the etcd column", flush=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "etcd-server", "etcd-client"],
            capture_output=True,
            timeout=600,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    if shutil.which("etcd") and shutil.which("etcdctl"):
        return None
    return "etcd is not installed (Debian: apt-get install etcd-server etcd-client); no etcd column"


class EtcdCluster(Cluster):
    """A 3-member etcd on 127.0.0.1 with its data in the same temp dir (so
    on the same disk); etcd always fsyncs (3.4 has no switch to stop it)."""

    system = "etcd"

    def __init__(self, procs: Processes, workdir: Path) -> None:
        super().__init__(procs, workdir, True)
        ports = free_ports(6)
        self.addresses = [f"{HOST}:{p}" for p in ports[:3]]
        self.peers = [f"{HOST}:{p}" for p in ports[3:]]

    def start_node(self, i: int) -> None:
        initial = ",".join(f"m{j}=http://{p}" for j, p in enumerate(self.peers))
        argv = ["etcd", "--name", f"m{i}", "--data-dir", str(self.workdir / f"m{i}")]
        argv += ["--listen-client-urls", f"http://{self.addresses[i]}"]
        argv += ["--advertise-client-urls", f"http://{self.addresses[i]}"]
        argv += ["--listen-peer-urls", f"http://{self.peers[i]}"]
        argv += ["--initial-advertise-peer-urls", f"http://{self.peers[i]}"]
        argv += [
            "--initial-cluster",
            initial,
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            "bench",
        ]
        self.procs.start(self.key(i), argv, self.log(i))

    def _statuses(self) -> list[dict[str, Any]] | None:
        done = subprocess.run(
            ["etcdctl", "--endpoints", ",".join(self.addresses), "endpoint", "status", "-w", "json"],
            capture_output=True,
            text=True,
            timeout=10,
            env={**os.environ, "ETCDCTL_API": "3"},
        )
        if done.returncode != 0:
            return None
        try:
            return [entry["Status"] for entry in json.loads(done.stdout)]
        except (ValueError, KeyError, TypeError):
            return None

    def leader(self) -> int | None:
        statuses = self._statuses()
        if not statuses or len(statuses) != 3:
            return None
        ids = [st["header"]["member_id"] for st in statuses]
        leaders = {st["leader"] for st in statuses}
        if len(leaders) != 1 or next(iter(leaders)) not in ids:
            return None
        return ids.index(next(iter(leaders)))

    def wait_settled(self, timeout: float) -> int:
        self.check_alive()
        return wait_for(self.leader, timeout, "etcd to elect a leader")

    def load_args(self) -> list[str]:
        leader = self.leader()
        return ["--etcd", f"http://{self.addresses[leader if leader is not None else 0]}"]


class PySyncObjCluster(Cluster):
    system = "PySyncObj"

    def __init__(self, procs: Processes, workdir: Path, durable: bool, batch: bool) -> None:
        super().__init__(procs, workdir, durable)
        self.batch = batch
        ports = free_ports(6)
        self.raft = [f"{HOST}:{p}" for p in ports[:3]]
        self.addresses = [f"{HOST}:{p}" for p in ports[3:]]

    def start_node(self, i: int) -> None:
        argv = [sys.executable, str(PYSYNCOBJ_SCRIPT), "--raft", self.raft[i], "--listen", self.addresses[i]]
        argv += ["--peers", ",".join(a for j, a in enumerate(self.raft) if j != i)]
        argv += ["--front-ends", ",".join(f"{r}={f}" for r, f in zip(self.raft, self.addresses, strict=True))]
        if self.durable:
            argv += ["--journal", str(self.workdir / f"node-{i}")]
        if self.batch:
            argv.append("--batch")
        self.procs.start(self.key(i), argv, self.log(i))


# ---------------------------------------------------------------------------
# The load generator
# ---------------------------------------------------------------------------


class LoadGenerator:
    """The load-generator process, spoken to in JSON lines."""

    def __init__(self, procs: Processes, key: str, addresses: list[str], log: Path) -> None:
        self.procs = procs
        self.key = key
        argv = [sys.executable, str(LOAD_SCRIPT), *addresses]
        self.proc = procs.start(key, argv, log, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.log = log

    def ask(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise RuntimeError(
                f"load generator: no answer to {request['cmd']} in {timeout:.0f}s; see {self.log}"
            )
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"load generator exited; see {self.log}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"load generator: {answer['error']}")
        return answer

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.write(b'{"cmd": "exit"}\n')
            self.proc.stdin.flush()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self.procs.stop(self.key)


@contextlib.contextmanager
def running(cluster: Cluster, procs: Processes) -> Iterator[LoadGenerator]:
    cluster.start()
    load = LoadGenerator(procs, f"load-{cluster.system}", cluster.load_args(), cluster.workdir / "load.log")
    try:
        yield load
    finally:
        load.close()
        cluster.stop()


def measure(cluster: Cluster, load: LoadGenerator, clients: int, warmup: float, seconds: float) -> dict:
    leader = cluster.leader()
    cpu0 = cluster.cpu_by_node()
    before = load.ask({"cmd": "total"}, 30)["total_ok"]
    result = load.ask(
        {"cmd": "measure", "clients": clients, "warmup": warmup, "seconds": seconds}, warmup + seconds + 60
    )
    user = [after[0] - start[0] for after, start in zip(cluster.cpu_by_node(), cpu0, strict=True)]
    system = [after[1] - start[1] for after, start in zip(cluster.cpu_by_node(), cpu0, strict=True)]
    cpu = [u + s for u, s in zip(user, system, strict=True)]
    writes = result["total_ok"] - before
    nan = float("nan")
    result["server_cpu_us"] = sum(cpu) / writes * 1e6 if writes else nan
    # The leader does most of the work: its CPU per write caps throughput.
    result["leader_cpu_us"] = cpu[leader] / writes * 1e6 if writes and leader is not None else nan
    # The kernel's share (socket calls, loopback delivery, fsync) of the leader's CPU.
    result["leader_sys_share"] = system[leader] / cpu[leader] if leader is not None and cpu[leader] else nan
    cluster.check_alive()
    return result


def combine(cells: list[dict]) -> dict:
    """One cell from its rounds: the median of each figure (errors summed),
    plus the throughput of every round so the spread shows."""
    combined: dict[str, Any] = {}
    for field in cells[0]:
        values = [c[field] for c in cells]
        if field == "errors":
            total: dict[str, int] = {}
            for errs in values:
                for name, count in errs.items():
                    total[name] = total.get(name, 0) + count
            combined[field] = total
        elif all(isinstance(v, int | float) for v in values):
            combined[field] = statistics.median(values)
    combined["rounds"] = [c["throughput"] for c in cells]
    return combined


def failover(cluster: Cluster, load: LoadGenerator, trials: int, say: Callable[[str], None]) -> list[float]:
    """SIGKILL the leader ``trials`` times under load; the seconds from each
    kill to the first write acknowledged by another node."""
    samples: list[float] = []
    load.ask({"cmd": "start", "clients": FAILOVER_CLIENTS}, 60)
    try:
        for trial in range(trials):
            leader = cluster.wait_settled(START_TIMEOUT)
            time.sleep(0.5)  # steady load, heartbeats flowing
            leader = cluster.leader()
            if leader is None:
                leader = cluster.wait_settled(START_TIMEOUT)
            address = cluster.addresses[leader]
            killed_at = time.monotonic()
            cluster.procs.kill(cluster.key(leader))
            answer = load.ask(
                {"cmd": "wait_success", "after": killed_at, "not_from": address, "timeout": FAILOVER_TIMEOUT},
                FAILOVER_TIMEOUT + 30,
            )
            if answer.get("timeout"):
                say(f"  trial {trial + 1}: no write acknowledged within {FAILOVER_TIMEOUT:.0f}s")
                samples.append(float("inf"))
            else:
                samples.append(answer["t"] - killed_at)
                say(f"  trial {trial + 1}: killed node {leader}, {samples[-1] * 1000:.0f} ms")
            cluster.start_node(leader)
    finally:
        load.ask({"cmd": "stop"}, 60)
    return samples


# ---------------------------------------------------------------------------
# Profiling
# ---------------------------------------------------------------------------


def steady_run(procs: Processes, workdir: Path, clients: int, seconds: float) -> str:
    """Elections in a healthy SurfShard group under load: the terms and
    leaders before and after ``seconds`` of ``clients`` writers (fsync on),
    nothing killed."""
    cluster = SurfShardCluster(procs, workdir / "steady", True)
    with running(cluster, procs) as load:
        before = [try_status(a) or {} for a in cluster.addresses]
        r = measure(cluster, load, clients, 1.0, seconds)
        after = [try_status(a) or {} for a in cluster.addresses]
    terms = sorted({s.get("term") for s in before}), sorted({s.get("term") for s in after})
    leaders = sorted({s.get("leader") for s in before}), sorted({s.get("leader") for s in after})
    elections = max(after[i].get("term", 0) - before[i].get("term", 0) for i in range(3))
    return (
        f"steady run: {clients} writers for {seconds:.0f} s, fsync on, nothing killed: {r['throughput']:.0f} ops/s, "
        f"terms {terms[0]} -> {terms[1]}, leader {leaders[0]} -> {leaders[1]}: {elections} election(s)"
    )


def profile_surfshard(procs: Processes, workdir: Path, clients: int, warmup: float, seconds: float) -> str:
    cluster = SurfShardCluster(procs, workdir / "profile", durable=False, profile=True)
    with running(cluster, procs) as load:
        leader = cluster.leader()
        result = measure(cluster, load, clients, warmup, seconds)
    out = io.StringIO()
    out.write(
        f"profile: SurfShard fsync off, {clients} writers under cProfile: {result['throughput']:.0f} ops/s "
        f"(profiling slows it), {result['leader_cpu_us']:.0f} us leader CPU per write\n"
    )
    follower = next(i for i in range(3) if i != leader)
    for role, i in (("leader", leader), ("follower", follower)):
        path = cluster.profile_path(i)
        if not path.exists():
            out.write(f"  no profile written for node {i}\n")
            continue
        stats = pstats.Stats(str(path), stream=out)
        out.write(f"\n--- {role} (node {i}), by own time ---\n")
        stats.sort_stats("tottime").print_stats(25)
        out.write(f"\n--- {role} (node {i}), by cumulative time ---\n")
        stats.sort_stats("cumulative").print_stats(30)
    return out.getvalue()


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def fmt_cell(r: dict | None) -> str:
    if r is None:
        return f"{'-':>7} {'-':>6} {'-':>6} {'-':>5} {'-':>5} {'-':>4}"
    errors = sum(r["errors"].values())
    return (
        f"{r['throughput']:7.0f} {r['p50_ms']:6.1f} {r['p99_ms']:6.1f} "
        f"{r['server_cpu_us']:5.0f} {r['leader_cpu_us']:5.0f} {errors:4d}"
    )


def ratio(a: dict | None, b: dict | None) -> str:
    if not a or not b or not b["throughput"]:
        return "    -"
    return f"{a['throughput'] / b['throughput']:5.2f}x"


def describe_failover(samples: list[float]) -> str:
    finite = [s for s in samples if s != float("inf")]
    lost = len(samples) - len(finite)
    if not finite:
        return "no successful failover"
    text = (
        f"median {statistics.median(finite) * 1000:4.0f} ms, p90 {percentile(finite, 0.9) * 1000:4.0f} ms, "
        f"max {max(finite) * 1000:4.0f} ms, min {min(finite) * 1000:4.0f} ms ({len(samples)} trials)"
    )
    return text + (f", {lost} with no write within {FAILOVER_TIMEOUT:.0f}s" if lost else "")


def report(results: dict, failovers: dict, levels: list[int], args: argparse.Namespace) -> str:
    lines = []
    header = f"{'ops/s':>7} {'p50ms':>6} {'p99ms':>6} {'cpuus':>5} {'ldrus':>5} {'err':>4}"
    lines.append("")
    lines.append(
        f"updatefile, 3 replicas on {HOST}, one load-generator process; "
        f"median of {args.rounds} round(s) of {args.seconds:g} s per cell, each after {args.warmup:g} s warm-up"
    )
    lines.append(
        "(cpuus = CPU microseconds of the 3 server processes per successful write; ldrus = the leader's share)"
    )
    lines.append(f"{'mode':<22}{'clients':>7} | {'SurfShard':^38} | {'PySyncObj':^38} | ours/PSO")
    lines.append(f"{'':<22}{'':>7} | {header} | {header} |")
    modes = [(True, "fsync on / journal"), (False, "fsync off / memory")]
    for durable, label in modes:
        for n in levels:
            ours = results.get(("SurfShard", durable, n))
            theirs = results.get(("PySyncObj", durable, n))
            lines.append(f"{label:<22}{n:>7} | {fmt_cell(ours)} | {fmt_cell(theirs)} | {ratio(ours, theirs)}")
    lines.append("")
    lines.append("ops/s of each round (the spread shows how much the shared machine moves the figures):")
    for durable, label in modes:
        for n in levels:
            cells = [results.get((system, durable, n)) for system in ("SurfShard", "PySyncObj")]
            spread = "  ".join(
                f"{system} " + "/".join(f"{t:.0f}" for t in cell["rounds"])
                for system, cell in zip(("SurfShard", "PySyncObj"), cells, strict=True)
                if cell
            )
            lines.append(f"  {label:<20}{n:>4}: {spread}")
    lines.append(
        "like-for-like durability (neither fsyncs): SurfShard fsync off vs PySyncObj journal "
        "(measured in different phases, so less reliable than the rows above):"
    )
    for n in levels:
        lines.append(
            f"  {n:>3} clients: {ratio(results.get(('SurfShard', False, n)), results.get(('PySyncObj', True, n)))}"
        )
    client_cpu = [
        f"{key[0]} {'on' if key[1] else 'off'} {key[2]}: {r['client_cpu']:.2f}" for key, r in results.items()
    ]
    lines.append("client process CPU (cores): " + ", ".join(client_cpu))
    errors = {
        f"{k[0]} {'on' if k[1] else 'off'} {k[2]}": r["errors"] for k, r in results.items() if r["errors"]
    }
    if errors:
        lines.append(f"errors: {errors}")
    etcd_rows = [n for n in levels if ("etcd", True, n) in results]
    if etcd_rows:
        lines.append("")
        lines.append(
            "etcd 3.4 in the same run (3 members on the same disk, fsync on as always; the same writers doing the "
            "same compare-and-set as a transaction on the key's version through etcd's gRPC gateway, HTTP/1.1 "
            "JSON, one connection per writer, to the leader):"
        )
        lines.append(f"{'':<22}{'clients':>7} | {'etcd':^38} | SurfShard fsync on / etcd")
        for n in etcd_rows:
            etcd_cell = results[("etcd", True, n)]
            lines.append(
                f"{'fsync on':<22}{n:>7} | {fmt_cell(etcd_cell)} | {ratio(results.get(('SurfShard', True, n)), etcd_cell)}"
            )
    lines.append("")
    if failovers:
        lines.append(
            f"failover (SIGKILL the leader under {FAILOVER_CLIENTS} writers -> first write acknowledged "
            "by the new leader), durable mode:"
        )
        for system, samples in failovers.items():
            lines.append(f"  {system:<10} {describe_failover(samples)}")
        lines.append("")
    top = max(levels)
    verdicts = []
    for durable, label in ((True, "fsync on"), (False, "fsync off")):
        ours, theirs = results.get(("SurfShard", durable, top)), results.get(("PySyncObj", durable, top))
        if ours and theirs:
            r = ours["throughput"] / theirs["throughput"]
            verdicts.append(f"{label} {r:.2f}x ({'met' if r >= 3 else 'NOT met'})")
    if verdicts:
        lines.append(f"target >= 3x PySyncObj at {top} clients: " + ", ".join(verdicts))
    if "SurfShard" in failovers:
        finite = [s for s in failovers["SurfShard"] if s != float("inf")]
        if finite:
            med = statistics.median(finite)
            lines.append(
                f"target median failover < 1 s: {med * 1000:.0f} ms ({'met' if med < 1.0 else 'NOT met'})"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per round (default 3)")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per cell (default 1)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="measure every cell this many times, take the median (default 3)",
    )
    parser.add_argument("--trials", type=int, default=10, help="failover trials per system (default 10)")
    parser.add_argument("--clients", default="1,16,64", help="concurrency levels (default 1,16,64)")
    parser.add_argument("--quick", action="store_true", help="short cells and 3 failover trials (~1 min)")
    parser.add_argument(
        "--only",
        choices=("surfshard", "pysyncobj", "etcd", "none"),
        help="run one system only (none: just --profile)",
    )
    parser.add_argument("--no-failover", action="store_true", help="skip the failover trials")
    parser.add_argument("--no-etcd", action="store_true", help="no etcd column even when etcd is installed")
    parser.add_argument(
        "--steady",
        type=float,
        metavar="SECONDS",
        help="also count SurfShard's elections over SECONDS at the highest --clients, nothing killed",
    )
    parser.add_argument("--pysyncobj-batch", action="store_true", help="PySyncObj with appendEntriesUseBatch")
    parser.add_argument(
        "--profile", action="store_true", help="also profile SurfShard (fsync off) at the highest --clients"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data, profiles)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.warmup, args.trials, args.rounds = (
            min(args.seconds, 1.5),
            min(args.warmup, 0.5),
            min(args.trials, 3),
            1,
        )
    levels = [int(x) for x in args.clients.split(",")]
    if args.seconds <= 0 or args.trials < 0 or args.rounds < 1 or any(n < 1 for n in levels):
        parser.error("need --seconds > 0, --trials >= 0, --rounds >= 1 and client counts >= 1")

    workdir = Path(tempfile.mkdtemp(prefix="surfshard-bench-"))
    procs = Processes()

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGINT too: a shell starting us in the background sets it to "ignore".
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)

    def say(text: str) -> None:
        print(text, flush=True)

    results: dict[tuple[str, bool, int], dict] = {}
    failovers: dict[str, list[float]] = {}
    systems = {
        None: ["SurfShard", "PySyncObj", "etcd"],
        "surfshard": ["SurfShard"],
        "pysyncobj": ["PySyncObj"],
        "etcd": ["etcd"],
    }.get(args.only, [])
    if "etcd" in systems:
        no_etcd = "--no-etcd given" if args.no_etcd else ensure_etcd()
        if no_etcd:
            say(f"no etcd column: {no_etcd}")
            systems.remove("etcd")
    started = time.monotonic()
    try:
        for durable in (True, False):
            mode = "fsync on" if durable else "fsync off"
            clusters: list[Cluster] = []
            for system in systems:
                sub = workdir / f"{system}-{'durable' if durable else 'fast'}"
                if system == "SurfShard":
                    clusters.append(SurfShardCluster(procs, sub, durable))
                elif system == "PySyncObj":
                    clusters.append(PySyncObjCluster(procs, sub, durable, args.pysyncobj_batch))
                elif durable:  # etcd always fsyncs: a column in the fsync-on rows only
                    clusters.append(EtcdCluster(procs, sub))
            say(f"{mode}: starting {' and '.join(c.system for c in clusters)} (3 nodes each)")
            with contextlib.ExitStack() as stack:
                loads = []
                for c in list(clusters):
                    try:
                        loads.append(stack.enter_context(running(c, procs)))
                    except RuntimeError as e:
                        if c.system != "etcd":
                            raise
                        # The column is optional: the run goes on without it.
                        c.stop()
                        clusters.remove(c)
                        tail = (
                            c.log(0).read_text(errors="replace").splitlines()[-3:]
                            if c.log(0).exists()
                            else []
                        )
                        say(f"etcd did not start ({e}): no etcd column in this run; its log ends: {tail}")
                pairs = list(zip(clusters, loads, strict=True))
                rounds: dict[tuple[str, bool, int], list[dict]] = {}
                sweep = [n for _ in range(args.rounds) for n in levels]
                for k, n in enumerate(sweep):
                    # Both systems are up: measure them back to back, in
                    # alternating order, so a change in the machine's other
                    # load hits both alike.
                    for cluster, load in pairs if k % 2 == 0 else pairs[::-1]:
                        r = measure(cluster, load, n, args.warmup, args.seconds)
                        rounds.setdefault((cluster.system, durable, n), []).append(r)
                        say(
                            f"  {cluster.system:<9} {n:>3} clients: {r['throughput']:6.0f} ops/s  "
                            f"p50 {r['p50_ms']:5.1f} ms  p99 {r['p99_ms']:6.1f} ms  "
                            f"server cpu {r['server_cpu_us']:4.0f} us/write (leader {r['leader_cpu_us']:3.0f}, "
                            f"{r['leader_sys_share'] * 100:2.0f}% kernel)  "
                            f"client cpu {r['client_cpu']:.2f}  errors {r['errors'] or 0}"
                        )
                for key, cells in rounds.items():
                    results[key] = combine(cells)
                if durable and args.trials and not args.no_failover:
                    for cluster, load in pairs:
                        if cluster.system == "etcd":
                            continue  # its load generator speaks to the leader only
                        say(f"{cluster.system}: failover, {args.trials} trials")
                        failovers[cluster.system] = failover(cluster, load, args.trials, say)
        profile_text = (
            profile_surfshard(procs, workdir, max(levels), args.warmup, args.seconds) if args.profile else ""
        )
        steady_text = steady_run(procs, workdir, max(levels), args.steady) if args.steady else ""
    except KeyboardInterrupt:
        say("interrupted: stopping every process started")
        return 130
    finally:
        # A second Ctrl-C must not cut the clean-up short.
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        procs.stop_all()
        if args.keep:
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    say(report(results, failovers, levels, args))
    if steady_text:
        say(steady_text)
    say(f"total time {time.monotonic() - started:.0f} s")
    if profile_text:
        say(profile_text)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "results": [
                        {"system": k[0], "fsync": k[1], "clients": k[2], **v} for k, v in results.items()
                    ],
                    "failover_seconds": failovers,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
