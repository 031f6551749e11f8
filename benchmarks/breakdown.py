"""Where a write's time goes: a 3-node group under 1 and 4 writers, fsync
on and off, with every 10th log entry traced through its stages on the
leader and a follower (``SURFSHARD_TRACE_EVERY``; timestamps from the
host's monotonic clock, comparable between processes), and the system
calls of the leader and that follower counted with ``strace -c -f`` over
the measured seconds (when strace is installed; Debian's ``strace``).

It also prints, for each server process and the load generator, what the
Linux scheduler saw per write over the measured seconds (``/proc/PID/
schedstat`` and ``status``): CPU time, time spent runnable but waiting for
a core (run-queue wait), and involuntary context switches (preempted while
it had work), with how many of the machine's cores were busy in all. On a
machine with fewer cores than busy processes, a write's latency is CPU
time plus these waits: they tell whether a stage is slow because of its
own work or because it waited for another process's.

Stages of one entry (a batch of updates), in order:

- wait: the first update of the batch arrived -> the batch proposed
  (the batch collects what came in the same reactor turn);
- to send: proposed -> its AppendEntries handed to the transport;
- net: sent -> the follower's node received it;
- f.write: follower received -> written and fsynced (fsync on);
- f.ack: follower written -> its acknowledgement handed to its transport;
- net back: follower acked -> the leader received the acknowledgement;
- commit: leader received the ack -> the entry committed (also waits for
  the leader's own write, done in parallel after sending);
- apply: committed -> applied (and the callers answered).

Writers' end-to-end p50 comes from the load generator. Figures are printed
as medians in microseconds; nothing is asserted.

    python3 dev.py bench breakdown [--seconds 5]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import metadata as bench  # noqa: E402

STAGES = [
    ("wait", "arrived", "proposed", "leader", "leader"),
    ("to send", "proposed", "sent", "leader", "leader"),
    ("net", "sent", "received", "leader", "follower"),
    ("f.write", "received", "persisted", "follower", "follower"),
    ("f.ack", "persisted", "acked", "follower", "follower"),
    ("net back", "acked", "ack_received", "follower", "leader"),
    ("commit", "ack_received", "committed", "leader", "leader"),
    ("apply", "committed", "applied", "leader", "leader"),
]


def stage_medians(
    leader: dict[str, dict[str, float]], follower: dict[str, dict[str, float]]
) -> dict[str, float]:
    out: dict[str, list[float]] = {name: [] for name, *_ in STAGES}
    out["leader write"] = []
    out["total"] = []
    for index, lrec in leader.items():
        frec = follower.get(index, {})
        recs = {"leader": lrec, "follower": frec}
        for name, start, end, s_on, e_on in STAGES:
            a, b = recs[s_on].get(start), recs[e_on].get(end)
            if a is not None and b is not None:
                out[name].append((b - a) * 1e6)
        if "sent" in lrec and "persisted" in lrec:
            out["leader write"].append((lrec["persisted"] - lrec["sent"]) * 1e6)
        if "arrived" in lrec and "applied" in lrec:
            out["total"].append((lrec["applied"] - lrec["arrived"]) * 1e6)
    return {k: statistics.median(v) for k, v in out.items() if v}


def strace_start(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    if shutil.which("strace") is None:
        return None
    return subprocess.Popen(
        ["strace", "-c", "-f", "-q", "-o", str(out), "-p", str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def strace_stop(proc: subprocess.Popen[bytes] | None, out: Path) -> dict[str, int]:
    if proc is None:
        return {}
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    counts: dict[str, int] = {}
    if out.exists():
        for line in out.read_text().splitlines():
            m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$", line)
            if m:
                counts[m.group(2)] = int(m.group(1))
    return counts


def sched_snapshot(pid: int) -> tuple[float, float, int, float] | None:
    """(seconds on a CPU, seconds runnable and waiting, involuntary context
    switches, seconds in the kernel) of a live process, or None where the
    kernel does not say. The kernel's share is ``stime`` (in clock ticks:
    coarse, but thousands of writes long)."""
    try:
        run_ns, wait_ns, _slices = map(int, Path(f"/proc/{pid}/schedstat").read_text().split())
        status = Path(f"/proc/{pid}/status").read_text()
    except (OSError, ValueError):
        return None
    match = re.search(r"^nonvoluntary_ctxt_switches:\s*(\d+)", status, re.M)
    stime = bench.proc_cpu_seconds(pid)[1]
    return run_ns / 1e9, wait_ns / 1e9, int(match.group(1)) if match else 0, stime


def sched_per_write(
    before: dict[str, tuple[float, float, int, float] | None],
    after: dict[str, tuple[float, float, int, float] | None],
    writes: int,
    seconds: float,
) -> dict[str, Any]:
    """Each process's CPU and run-queue wait (us) and preemptions per write,
    and the cores busy in all over ``seconds``."""
    rows: dict[str, dict[str, float]] = {}
    busy = 0.0
    for role, start in before.items():
        end = after.get(role)
        if start is None or end is None or not writes:
            continue
        busy += end[0] - start[0]
        rows[role] = {
            "cpu": (end[0] - start[0]) / writes * 1e6,
            "wait": (end[1] - start[1]) / writes * 1e6,
            "preempted": (end[2] - start[2]) / writes,
            "kernel": (end[3] - start[3]) / writes * 1e6,
        }
    return {"rows": rows, "cores_busy": busy / seconds if seconds > 0 else float("nan")}


def run_cell(
    procs: bench.Processes, workdir: Path, durable: bool, clients: int, seconds: float
) -> dict[str, Any]:
    cluster = bench.SurfShardCluster(procs, workdir, durable=durable)
    with bench.running(cluster, procs) as load:
        leader = cluster.leader()
        assert leader is not None
        follower = next(i for i in range(3) if i != leader)
        other = next(i for i in range(3) if i not in (leader, follower))
        pids = {
            role: procs.children[cluster.key(i)].pid
            for role, i in (("leader", leader), ("follower", follower))
        }
        everyone = {**pids, "other follower": procs.children[cluster.key(other)].pid, "load": load.proc.pid}
        # Stages, throughput and the scheduler's view without strace (ptrace
        # slows every call)...
        load.ask({"cmd": "measure", "clients": clients, "warmup": 1.0, "seconds": 0.5}, 60)
        total_before = load.ask({"cmd": "total"}, 30)["total_ok"]
        sched_before = {role: sched_snapshot(pid) for role, pid in everyone.items()}
        started = time.monotonic()
        result = load.ask(
            {"cmd": "measure", "clients": clients, "warmup": 0.0, "seconds": seconds}, seconds + 60
        )
        sched_after = {role: sched_snapshot(pid) for role, pid in everyone.items()}
        sched = sched_per_write(
            sched_before, sched_after, result["total_ok"] - total_before, time.monotonic() - started
        )
        statuses = {
            role: bench.try_status(cluster.addresses[i]) or {}
            for role, i in (("leader", leader), ("follower", follower))
        }
        # ... then system calls per write, counted over a window of their own.
        traces = {role: workdir / f"strace-{role}.txt" for role in pids}
        tracers = {role: strace_start(pid, traces[role]) for role, pid in pids.items()}
        time.sleep(0.5)  # strace attached before the window
        counted = load.ask({"cmd": "measure", "clients": clients, "warmup": 0.0, "seconds": 2.0}, 60)
        syscalls = {role: strace_stop(tracers[role], traces[role]) for role in pids}
    writes = counted["ok"]
    medians = stage_medians(statuses["leader"].get("trace", {}), statuses["follower"].get("trace", {}))
    per_write = {
        role: {name: n / writes for name, n in sorted(counts.items(), key=lambda kv: -kv[1])[:6]}
        for role, counts in syscalls.items()
        if writes
    }
    return {"result": result, "stages": medians, "syscalls": per_write, "sched": sched}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", default="1,4")
    args = parser.parse_args()
    os.environ["SURFSHARD_TRACE_EVERY"] = "10"
    procs = bench.Processes()
    work = Path(tempfile.mkdtemp(prefix="surfshard-breakdown-"))
    try:
        for durable in (True, False):
            for clients in [int(c) for c in args.clients.split(",")]:
                cell = run_cell(procs, work / f"{durable}-{clients}", durable, clients, args.seconds)
                r = cell["result"]
                print(
                    f"\nfsync {'on' if durable else 'off'}, {clients} writer(s): {r['throughput']:.0f} writes/s, "
                    f"p50 {r['p50_ms'] * 1000:.0f} us end to end (client)"
                )
                stages = cell["stages"]
                order = [name for name, *_ in STAGES] + ["leader write", "total"]
                print(
                    "  stage medians (us): " + ", ".join(f"{n} {stages[n]:.0f}" for n in order if n in stages)
                )
                sched = cell["sched"]
                if sched["rows"]:
                    print(
                        f"  scheduler, per write ({sched['cores_busy']:.2f} of {os.cpu_count()} cores busy):"
                    )
                    for role, row in sched["rows"].items():
                        print(
                            f"    {role:<15} cpu {row['cpu']:6.1f} us (kernel {row['kernel']:5.0f}), "
                            f"waiting for a core {row['wait']:6.1f} us, "
                            f"preempted {row['preempted']:.2f} times"
                        )
                for role, counts in cell["syscalls"].items():
                    print(
                        f"  {role} syscalls per write: "
                        + ", ".join(f"{k} {v:.1f}" for k, v in counts.items())
                    )
        return 0
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
