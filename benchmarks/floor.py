"""How fast can a replicated write be on this machine and this stack? SurfShard
and PySyncObj next to the floor group (``benchmarks/_floor_node.py``): three
Twisted processes doing only what a replicated write cannot do without (the
hops, the frame codec, the log write and its sync), with no Raft, no state
machine and no checks.

    python3 dev.py bench floor [--clients 1,4,64] [--rounds 3] [--seconds 3] [--warmup 1]

The three systems run side by side under the same load generator
(``benchmarks/_metadata_load.py``, the one ``benchmarks/metadata.py``
uses), measured back to back in rotating order at each concurrency, with
fsync on (PySyncObj: its journal, never synced; the floor: ``fdatasync``
on the leader and the followers, as SurfShard) and off (PySyncObj: memory;
the floor and SurfShard: the log written, not synced). Each cell is the
median of ``--rounds`` rounds.

For each cell it prints ops/s, p50 and the leader's CPU per write of the
three, and what the floor says about issue 16's aims: an aim above what the
floor reaches in the same run cannot be met by any server built on this
stack on this machine, whatever its Raft does. Figures are printed, never
asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import metadata as bench  # noqa: E402

FLOOR_SCRIPT = ROOT / "benchmarks" / "_floor_node.py"


class FloorCluster(bench.Cluster):
    system = "floor"

    def __init__(self, procs: bench.Processes, workdir: Path, durable: bool) -> None:
        super().__init__(procs, workdir, durable)
        ports = bench.free_ports(6)
        self.addresses = [f"{bench.HOST}:{p}" for p in ports[:3]]
        self.peers = [f"{bench.HOST}:{p}" for p in ports[3:]]

    def start_node(self, i: int) -> None:
        argv = [sys.executable, str(FLOOR_SCRIPT), "--index", str(i)]
        argv += ["--fronts", ",".join(self.addresses), "--peers", ",".join(self.peers)]
        argv += ["--dir", str(self.workdir / f"node-{i}")]
        if self.durable:
            argv.append("--fsync")
        self.procs.start(self.key(i), argv, self.log(i))


#: Issue 16's aims, as (system whose figure is compared, writers, fsync,
#: what is asked, in ops/s relative to PySyncObj's). p50 and CPU aims are
#: printed next to the floor's figures.
AIMS = [
    (1, True, 1.0, "SurfShard level with PySyncObj at 1 writer, fsync on"),
    (4, True, 1.0, "SurfShard level with PySyncObj at 4 writers, fsync on"),
    (1, False, 1.3, "SurfShard 1.3x PySyncObj at 1 writer, fsync off"),
    (64, True, 5.0, "SurfShard 5x PySyncObj at 64 writers, fsync on"),
    (64, False, 5.0, "SurfShard 5x PySyncObj at 64 writers, fsync off"),
]


def report(results: dict[tuple[str, bool, int], dict], levels: list[int]) -> str:
    out = [
        "",
        "medians of the rounds; ops/s, p50 ms, leader CPU us/write (ops/s of each round in brackets)",
        "",
        f"{'mode':<10}{'writers':>8}  {'SurfShard':>26}  {'PySyncObj':>26}  {'floor':>26}  "
        f"{'SurfShard/floor':>15}  {'PySyncObj/floor':>15}",
    ]
    for durable in (True, False):
        for n in levels:
            cells = [results.get((s, durable, n)) for s in ("SurfShard", "PySyncObj", "floor")]
            if not all(cells):
                continue
            shown = [f"{c['throughput']:7.0f} {c['p50_ms']:5.2f} {c['leader_cpu_us']:6.0f}" for c in cells]
            s, p, f = (c["throughput"] for c in cells)
            out.append(
                f"{'fsync on' if durable else 'fsync off':<10}{n:>8}  "
                + "  ".join(f"{x:>26}" for x in shown)
                + f"  {s / f:>15.2f}  {p / f:>15.2f}"
            )
            out.append(" " * 20 + "  ".join(f"{str([round(r) for r in c['rounds']]):>26}" for c in cells))
    out.append("")
    for n, durable, times, what in AIMS:
        pso = results.get(("PySyncObj", durable, n))
        floor = results.get(("floor", durable, n))
        ours = results.get(("SurfShard", durable, n))
        if not (pso and floor and ours):
            continue
        target = times * pso["throughput"]
        verdict = (
            "above the floor: out of reach on this stack and machine"
            if target > floor["throughput"]
            else f"under the floor (the floor is {floor['throughput'] / target:.2f}x the aim)"
        )
        out.append(
            f"{what}: aim {target:.0f} ops/s, SurfShard {ours['throughput']:.0f}, "
            f"floor {floor['throughput']:.0f}: {verdict}"
        )
    for durable in (True, False):
        floor = results.get(("floor", durable, 1))
        if floor:
            out.append(
                f"p50 at 1 writer, fsync {'on' if durable else 'off'}: floor {floor['p50_ms']:.2f} ms "
                f"(aim for SurfShard with fsync on: 0.6 ms)"
            )
    top = max(levels)
    floor = results.get(("floor", False, top))
    if floor:
        out.append(
            f"leader CPU per write at {top} writers, fsync off: floor {floor['leader_cpu_us']:.1f} us "
            "(aim for SurfShard: 15 us)"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,4,64")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--modes", default="on,off", help="fsync modes to run (default on,off)")
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.clients.split(",")]
    modes = [m.strip() == "on" for m in args.modes.split(",")]
    if args.rounds < 1 or args.seconds <= 0 or any(n < 1 for n in levels):
        parser.error("need --rounds >= 1, --seconds > 0 and client counts >= 1")

    workdir = Path(tempfile.mkdtemp(prefix="surfshard-floor-"))
    procs = bench.Processes()

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)
    results: dict[tuple[str, bool, int], dict] = {}
    started = time.monotonic()
    try:
        for durable in modes:
            sub = workdir / ("durable" if durable else "fast")
            clusters: list[bench.Cluster] = [
                bench.SurfShardCluster(procs, sub / "surfshard", durable),
                bench.PySyncObjCluster(procs, sub / "pysyncobj", durable, False),
                FloorCluster(procs, sub / "floor", durable),
            ]
            print(
                f"fsync {'on' if durable else 'off'}: starting SurfShard, PySyncObj and the floor", flush=True
            )
            with contextlib.ExitStack() as stack:
                pairs = [(c, stack.enter_context(bench.running(c, procs))) for c in clusters]
                rounds: dict[tuple[str, bool, int], list[dict]] = {}
                sweep = [n for _ in range(args.rounds) for n in levels]
                for k, n in enumerate(sweep):
                    order = pairs[k % 3 :] + pairs[: k % 3]  # rotate who goes first
                    for cluster, load in order:
                        r = bench.measure(cluster, load, n, args.warmup, args.seconds)
                        rounds.setdefault((cluster.system, durable, n), []).append(r)
                        print(
                            f"  {cluster.system:<9} {n:>3} writers: {r['throughput']:6.0f} ops/s  "
                            f"p50 {r['p50_ms']:5.2f} ms  leader cpu {r['leader_cpu_us']:4.0f} us/write  "
                            f"server cpu {r['server_cpu_us']:4.0f}  errors {r['errors'] or 0}",
                            flush=True,
                        )
                for key, cells in rounds.items():
                    results[key] = bench.combine(cells)
    except KeyboardInterrupt:
        print("interrupted: stopping every process started")
        return 130
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    print(report(results, levels))
    print(f"total time {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
